//! SR-IOV on KVM with the real `manifold` binary: a virtio-blk PF (`--disk path=IMG,vfs=N`)
//! behind a root port, driven by the `sriov` test guest the way Linux's PCI core enables VFs.
//! Needs /dev/kvm.

mod common;

use std::io::Read;
use std::os::unix::fs::FileExt;

use common::{Running, TempFile, guest_path as path, manifold, run};

const IMAGE: usize = 8 << 20;

/// What the guest writes: `MFVF`, cycle, VF, then bytes of both (as `pattern` in sriov.c).
fn pattern(cycle: u8, vf: u8) -> Vec<u8> {
    let mut p: Vec<u8> = (0..512u32)
        .map(|i| (i * 13 + u32::from(cycle) * 7 + u32::from(vf) * 31 + 1) as u8)
        .collect();
    p[..4].copy_from_slice(b"MFVF");
    p[4] = cycle;
    p[5] = vf;
    p
}

/// Bytes per VF region: the image divided by the VF count, rounded down to 4 KiB.
fn region(vfs: usize) -> usize {
    IMAGE / vfs / 4096 * 4096
}

/// Threads, open fds and anonymous resident memory (KiB) of a process.
fn usage(pid: u32) -> (usize, usize, u64) {
    let count = |dir: String| std::fs::read_dir(dir).expect("proc dir").count();
    let mut status = String::new();
    std::fs::File::open(format!("/proc/{pid}/status"))
        .and_then(|mut f| f.read_to_string(&mut status))
        .expect("proc status");
    let anon = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("RssAnon");
    (
        count(format!("/proc/{pid}/task")),
        count(format!("/proc/{pid}/fd")),
        anon,
    )
}

/// Enable 3, 7, 1, 8, 3 and 5 VFs in turn: each VF is a whole disk on its own region of the
/// image and writes there only; disabling leaves no thread, fd or memory behind. The guest
/// numbers the port's bus 3 (the builder gave it 1).
#[test]
fn blk_vfs_enable_write_disable_repeatedly() {
    cycles(&[3, 7, 1, 8, 3, 5], "bus=3", &[]);
}

/// The same behind the virtio-iommu: every VF is an endpoint of its own (the VIOT names them
/// all), driven through its own domain's IOVAs; a VF given another VF's IOVA is refused with a
/// fault event naming it; a routing id past NumVFs is no endpoint. Endpoints come and go with
/// the VFs, cycle after cycle.
#[test]
fn blk_vfs_each_their_own_iommu_endpoint() {
    let out = cycles(&[2, 4, 3], "iommu=1", &["--iommu"]);
    for cycle in 0..3 {
        assert!(
            out.stdout
                .contains(&format!("sriov cycle {cycle} isolation ok")),
            "{out:?}"
        );
    }
}

/// Run the `sriov` guest over `counts` (VFs per cycle) on a PF with 8 VFs and check every
/// cycle from the host: the patterns in the image, then threads, fds and memory.
fn cycles(counts: &[u8], cmdline: &str, args: &[&str]) -> common::Output {
    let img = TempFile::new(&format!("sriov-{cmdline}.img"), &vec![0u8; IMAGE]);
    let list: Vec<String> = counts.iter().map(u8::to_string).collect();
    let cmdline = format!("{cmdline} vfs={}", list.join("."));
    let iommu = if args.contains(&"--iommu") {
        ",iommu=on"
    } else {
        ""
    };
    let disk = format!("path={},vfs=8{iommu}", img.path());
    let mut cmd = manifold();
    cmd.args([
        "run",
        "--kernel",
        &path("sriov-pvh.elf"),
        "--cmdline",
        &cmdline,
        "--memory",
        "size=64M",
        "--disk",
        &disk,
    ])
    .args(args);
    let mut vm = Running::start(&mut cmd);
    let pid = vm.child.id();
    let file = std::fs::File::open(img.path()).expect("image");
    let mut baseline = None;
    for (cycle, &n) in counts.iter().enumerate() {
        let line = vm.wait_for(&format!("sriov cycle {cycle} written"));
        assert!(line.contains(&format!("written {n},")), "{line}");
        let part = region(usize::from(n));
        assert!(
            line.contains(&format!("{} sectors each", part / 512)),
            "{line}"
        );
        let mut image = vec![0u8; IMAGE];
        file.read_exact_at(&mut image, 0).expect("read image");
        for vf in 0..n {
            let want = pattern(cycle as u8, vf);
            let at: Vec<usize> = (0..IMAGE / 512)
                .map(|s| s * 512)
                .filter(|&o| image[o..o + 512] == want[..])
                .collect();
            let start = usize::from(vf) * part;
            assert_eq!(
                at,
                vec![start, start + part - 512],
                "cycle {cycle}: VF {vf}'s pattern must be at the start and end of its region \
                 only"
            );
        }
        vm.write(b"c");
        vm.wait_for(&format!("sriov cycle {cycle} disabled"));
        let now = usage(pid);
        match baseline {
            // After the first cycle: allocator arenas and the VF event set exist.
            None => baseline = Some(now),
            Some((threads, fds, anon)) => {
                assert_eq!(now.0, threads, "threads after cycle {cycle}");
                assert_eq!(now.1, fds, "open fds after cycle {cycle}");
                assert!(
                    now.2 <= anon + 256,
                    "anonymous memory grew from {anon} KiB to {} KiB by cycle {cycle}",
                    now.2
                );
            }
        }
        vm.write(b"d");
    }
    vm.wait_for("sriov passed");
    let out = vm.finish();
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(!out.stdout.contains("FAILED"), "{out:?}");
    out
}

/// `vfs=` is checked: above TotalVFs' limit (255) or not a number is bad input (status 2, one
/// line); `--dry-run` shows it.
#[test]
fn vfs_option_checked_and_shown() {
    for bad in ["vfs=256", "vfs=x", "vfs=-1"] {
        let out = run(&[
            "run",
            "--kernel",
            "/nonexistent",
            "--disk",
            &format!("path=/tmp/x.img,{bad}"),
        ]);
        assert_eq!(out.code(), 2, "{bad}: {out:?}");
        assert_eq!(out.stderr.lines().count(), 1, "{bad}: {out:?}");
        assert!(out.stderr.contains("vfs"), "{bad}: {out:?}");
    }
    let img = TempFile::new("sriov-dry.img", &[0u8; 4096]);
    let out = run(&[
        "run",
        "--kernel",
        &path("sriov-pvh.elf"),
        "--disk",
        &format!("path={},vfs=4", img.path()),
        "--dry-run",
    ]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(out.stdout.contains("\"vfs\": 4"), "{out:?}");
}
