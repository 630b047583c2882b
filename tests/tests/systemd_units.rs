//! The files in `systemd/`: the unit (with each board drop-in) passes `systemd-analyze verify`
//! without a warning, its offline security exposure is at most 2.5, the sysusers file makes
//! the service user, and the example configuration is one the daemon accepts.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::path::Path;
use std::process::Command;

use fieldllm_tests::{fieldllmd, repo_root, run, texts};

/// The unit with `ExecStart` pointing at the built binary (verify checks it is executable),
/// and the board drop-ins beside it, in `dir`.
fn staged_unit(dir: &Path) -> std::path::PathBuf {
    let unit = std::fs::read_to_string(repo_root().join("systemd/fieldllmd.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/fieldllmd serve"));
    let unit = unit.replace("/usr/bin/fieldllmd", &fieldllmd().to_string_lossy());
    let path = dir.join("fieldllmd.service");
    std::fs::write(&path, unit).unwrap();
    let d = dir.join("fieldllmd.service.d");
    std::fs::create_dir(&d).unwrap();
    for f in ["jetson.conf", "rockchip.conf"] {
        std::fs::copy(repo_root().join("systemd/dropins").join(f), d.join(f)).unwrap();
    }
    path
}

#[test]
fn the_unit_verifies_cleanly_with_every_drop_in() {
    let dir = tempfile::tempdir().unwrap();
    let unit = staged_unit(dir.path());
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    let (out, err) = texts(&o);
    assert!(o.status.success(), "{out}{err}");
    // verify exits 0 on unknown keys and bad values: any line at all is a finding
    assert!(err.trim().is_empty() && out.trim().is_empty(), "{out}{err}");
}

#[test]
fn the_units_exposure_is_at_most_2_5() {
    let dir = tempfile::tempdir().unwrap();
    let unit = staged_unit(dir.path());
    let o = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let (out, err) = texts(&o);
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level for fieldllmd.service"))
        .unwrap_or_else(|| panic!("no overall exposure line:\n{out}{err}"));
    let level: f32 = line
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unparsable: {line}"));
    println!("systemd-analyze security --offline=yes: exposure {level}");
    assert!(level <= 2.5, "{line}");
}

#[test]
fn sysusers_makes_the_service_user() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    let o = Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .arg(repo_root().join("systemd/fieldllm.sysusers"))
        .output()
        .unwrap();
    let (out, err) = texts(&o);
    assert!(o.status.success(), "{out}{err}");
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let user = passwd
        .lines()
        .find(|l| l.starts_with("fieldllm:"))
        .unwrap_or_else(|| panic!("{passwd}"));
    assert!(
        user.ends_with(":/var/lib/fieldllm:/usr/sbin/nologin"),
        "{user}"
    );
    let group = std::fs::read_to_string(root.path().join("etc/group")).unwrap();
    assert!(group.lines().any(|l| l.starts_with("fieldllm:")), "{group}");
}

#[test]
fn the_example_configuration_is_accepted_and_matches_the_unit() {
    // `thermal` reads the whole file (every section is checked) and needs no model
    let conf = repo_root().join("systemd/fieldllmd.toml");
    let fixture = repo_root().join("firmware-bridge/tests/fixtures/x86-coretemp");
    let o = run(&[
        "thermal",
        "--config",
        &conf.to_string_lossy(),
        "--sysfs-root",
        &fixture.to_string_lossy(),
        "--count",
        "1",
    ]);
    let (out, err) = texts(&o);
    assert!(o.status.success(), "{out}{err}");
    let text = std::fs::read_to_string(&conf).unwrap();
    let unit = std::fs::read_to_string(repo_root().join("systemd/fieldllmd.service")).unwrap();
    assert!(unit.contains("--config /etc/fieldllm/fieldllmd.toml"));
    // the stop grace must fit inside the unit's stop timeout
    assert!(text.contains("grace_s = 10") && unit.contains("TimeoutStopSec=30"));
}
