//! The multi guest: blk, rng, console and vsock in one VM, each behind the virtio-iommu or not.

use super::{Output, TempDir, TempFile, guest_path as path, run};

/// Boots the multi guest with a disk, rng, a console to a file and vsock (`iommu=on` on each, and
/// `--iommu`, when `iommu`); returns the run and what the guest wrote to the console file.
pub fn run_multi(name: &str, iommu: bool) -> (Output, String) {
    let mut image = b"multi-disk-0".to_vec();
    image.resize(1 << 20, 0);
    let disk = TempFile::new(&format!("{name}.img"), &image);
    let console = TempFile::new(&format!("{name}-console.out"), b"");
    let dir = TempDir::new(name);
    let on = if iommu { ",iommu=on" } else { "" };
    let kernel = path("multi-pvh.elf");
    let disk_arg = format!("path={}{on}", disk.path());
    let console_arg = format!("file={}{on}", console.path());
    let vsock_arg = format!("cid=7,socket={}{on}", dir.join("vsock.sock"));
    let mut args = vec![
        "run",
        "--kernel",
        &kernel,
        "--cmdline",
        "multi-disk-0",
        "--memory",
        "size=64M",
    ];
    if iommu {
        args.push("--iommu");
    }
    args.extend(["--disk", &disk_arg, "--rng"]);
    if iommu {
        args.push("iommu=on");
    }
    args.extend(["--console", &console_arg, "--vsock", &vsock_arg]);
    args.extend(["--log-level", "debug"]);
    let out = run(&args);
    let written = std::fs::read_to_string(console.path()).expect("read console file");
    (out, written)
}
