//! The test bed's own promises: it starts, it stops leaving no process and no port
//! behind, and a run that crashed does not break the next one.

// Test code: a failed unwrap is a failed test. The leftover `sleep` is reaped by the
// clean-up under test, not by a `wait()` here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::zombie_processes)]

use std::{
    fs,
    net::TcpStream,
    os::unix::process::CommandExt,
    process::{Command, Stdio},
    time::Duration,
};

use weft_e2e::{TestBed, process, testbed::reap_stale};

fn pids(bed: &TestBed) -> Vec<i32> {
    fs::read_to_string(bed.dir().join("pids"))
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect()
}

#[test]
fn stopping_leaves_no_process_and_no_port() {
    let mut bed = TestBed::start_attached().expect("test bed starts");
    let pids = pids(&bed);
    assert_eq!(
        pids.len(),
        3,
        "etcd, kube-apiserver, kube-controller-manager"
    );
    let addr = bed.server().trim_start_matches("https://").to_owned();
    assert!(
        TcpStream::connect(&addr).is_ok(),
        "API server listening on {addr}"
    );
    let dir = bed.dir().to_path_buf();

    bed.stop();
    drop(bed);

    for pid in pids {
        assert!(
            !process::alive(pid),
            "process {pid} still running after stop"
        );
    }
    assert!(
        TcpStream::connect(&addr).is_err(),
        "{addr} still accepting after stop"
    );
    assert!(
        !dir.exists(),
        "state directory {} left behind",
        dir.display()
    );
}

#[test]
fn a_crashed_run_is_cleaned_up_by_the_next() {
    // A previous run that died: its owner is gone, one of its processes is still running.
    let root = std::env::temp_dir().join("weft-testbed");
    let staging = root.join(".crashed-run");
    let stale = root.join("crashed-run");
    fs::create_dir_all(&staging).unwrap();
    let mut dead_owner = Command::new("true").spawn().unwrap();
    let owner_pid = dead_owner.id();
    dead_owner.wait().unwrap();
    let leftover = Command::new("sleep")
        .arg("300")
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    fs::write(staging.join("owner"), owner_pid.to_string()).unwrap();
    fs::write(staging.join("pids"), format!("{}\n", leftover.id())).unwrap();
    fs::rename(&staging, &stale).unwrap();

    reap_stale(&root);

    let pid = i32::try_from(leftover.id()).unwrap();
    let mut stopped = false;
    for _ in 0..100 {
        // Reaped by the clean-up itself (it waits for what it stops), so only existence
        // can be checked, not an exit status.
        if !process::alive(pid) {
            stopped = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(stopped, "the leftover process was not stopped");
    assert!(!stale.exists(), "the stale state directory was not removed");

    // And a new test bed starts fine afterwards.
    let bed = TestBed::start_attached().expect("test bed starts after a crashed run");
    assert!(bed.kubeconfig().exists());
}
