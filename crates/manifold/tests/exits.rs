//! Notification cost, counted: the blk test guest with N extra one-sector reads (one queue kick
//! and one MSI-X interrupt each) must leave the vCPU thread's port I/O and MMIO exit counts
//! (logged at debug level when the vCPU loop ends) as they were with none: every kick is
//! caught by an ioeventfd and every interrupt goes through an irqfd.

mod common;

use common::{guest, run};

/// The counts of the "vCPU exits to userspace" line of vCPU 0, by kind.
fn exits(stderr: &str) -> Vec<(String, u64)> {
    let line = stderr
        .lines()
        .find(|l| l.contains("vCPU exits to userspace") && l.contains("vcpu=0"))
        .unwrap_or_else(|| panic!("no exit counts in: {stderr}"));
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect()
}

fn count(exits: &[(String, u64)], kind: &str) -> u64 {
    exits
        .iter()
        .find(|(k, _)| k == kind)
        .map(|&(_, v)| v)
        .unwrap_or_else(|| panic!("no {kind} in {exits:?}"))
}

#[test]
fn blk_requests_cost_no_pio_or_mmio_exits() {
    let dir = std::env::temp_dir();
    let rw = dir.join(format!("manifold-test-{}-exits-rw.img", std::process::id()));
    let ro = dir.join(format!("manifold-test-{}-exits-ro.img", std::process::id()));
    std::fs::write(&rw, vec![0u8; 1 << 20]).expect("image");
    std::fs::write(&ro, vec![0u8; 1 << 20]).expect("image");
    let kernel = guest("blk-pvh.elf").to_string_lossy().into_owned();
    let mut counts = Vec::new();
    for reads in [0u32, 50] {
        let out = run(&[
            "run",
            "--kernel",
            &kernel,
            "--cmdline",
            &format!("blk-serial-0 reads={reads}"),
            "--memory",
            "size=64M",
            "--disk",
            &format!("path={},serial=blk-serial-0", rw.display()),
            "--disk",
            &format!("path={},readonly=on", ro.display()),
            "--log-level",
            "debug",
        ]);
        assert!(out.stdout.contains("blk passed"), "{out:?}");
        assert!(
            out.stdout.contains(&format!("reads: {reads} of {reads}")),
            "{out:?}"
        );
        counts.push(exits(&out.stderr));
    }
    let _ = std::fs::remove_file(&rw);
    let _ = std::fs::remove_file(&ro);
    // The extra reads print one more line on COM1 ("reads: 50 of 50" is one character longer
    // than "reads: 0 of 0"): a few port writes and line-status reads, not one per request.
    for kind in ["mmio_write", "mmio_read"] {
        assert_eq!(
            count(&counts[0], kind),
            count(&counts[1], kind),
            "{kind}: {counts:?}"
        );
    }
    for kind in ["pio_out", "pio_in"] {
        let (a, b) = (count(&counts[0], kind), count(&counts[1], kind));
        assert!(b >= a && b - a < 10, "{kind}: {counts:?}");
    }
}
