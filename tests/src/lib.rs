//! Helpers shared by the end-to-end tests: the `fieldllmd` binary and the model directories.

pub mod corpus;
pub mod mqtt;
pub mod pdf;
pub mod serial;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `models/build/NAME`; fails with the fix when `models/setup.sh` has not run.
pub fn model_dir(name: &str) -> PathBuf {
    let dir = repo_root().join("models/build").join(name);
    assert!(
        dir.join("manifest.toml").exists(),
        "{} is missing: run tests/run.sh (it runs models/setup.sh first)",
        dir.display()
    );
    dir
}

/// Path of a `fieldllmd` built from this checkout. `$FIELDLLMD_BIN` wins (tests/run.sh sets
/// it); otherwise the test builds it once, the way `cargo test --workspace` does (all members,
/// dev-dependencies included), so the build reuses the test build instead of resolving other
/// features and recompiling tract.
pub fn fieldllmd() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("FIELDLLMD_BIN") {
            return PathBuf::from(p);
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "--workspace", "--tests"])
            .current_dir(repo_root())
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build --workspace --tests failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target"));
        target.join("debug/fieldllmd")
    })
}

/// Runs `fieldllmd ARGS` to completion.
pub fn run(args: &[&str]) -> Output {
    Command::new(fieldllmd())
        .args(args)
        .env_remove("FIELDLLM_MODEL")
        .env_remove("RUST_LOG")
        .current_dir(repo_root())
        .output()
        .expect("start fieldllmd")
}

/// stdout and stderr as text.
pub fn texts(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Asserts a run refused for bad input: exit status 1 (README's promise), no panic, and
/// stderr mentioning every `needle`.
pub fn assert_clean_failure(o: &Output, needles: &[&str]) {
    assert_exit(o, 1, needles);
}

/// Asserts a run refused for flags it could not parse: exit status 2, as clap and getopt
/// tools use, no panic, and stderr mentioning every `needle`.
pub fn assert_usage_failure(o: &Output, needles: &[&str]) {
    assert_exit(o, 2, needles);
}

fn assert_exit(o: &Output, code: i32, needles: &[&str]) {
    let (_, err) = texts(o);
    assert_eq!(
        o.status.code(),
        Some(code),
        "expected exit status {code}; stderr: {err}"
    );
    assert!(!err.contains("panicked"), "panicked: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr does not mention {n:?}: {err}");
    }
}

/// A free TCP port on loopback (bound, read, released).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    l.local_addr().expect("local addr").port()
}

fn wait_for_port(port: u16, what: &str, child: &mut std::process::Child, log: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited ({status}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not listen on {port}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A mosquitto broker (Debian's) on a free loopback port with its own config; killed on drop.
pub struct Mosquitto {
    /// Its port.
    pub port: u16,
    child: std::process::Child,
    /// Directory with its config and log.
    pub dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts one; `extra` is appended to the listener's config.
    pub fn start(extra: &str) -> Mosquitto {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        Mosquitto::start_on(port, extra, dir)
    }

    /// Starts one on `port` (to restart a broker where clients expect it).
    pub fn start_on(port: u16, extra: &str, dir: tempfile::TempDir) -> Mosquitto {
        // mosquitto started as root drops to its own user, which must still write its log
        // and persistence file here
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod broker dir");
        let conf = dir.path().join("mosquitto.conf");
        let log = dir.path().join("mosquitto.log");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\n{}log_dest file {}\n{extra}\n",
                if extra.contains("persistence") {
                    ""
                } else {
                    "persistence false\n"
                },
                log.display()
            ),
        )
        .expect("write conf");
        let mut child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start mosquitto (apt-get install mosquitto)");
        wait_for_port(port, "mosquitto", &mut child, &log);
        Mosquitto { port, child, dir }
    }

    /// Stops it (SIGSTOP): connections stay open and nothing is acknowledged, as when a
    /// broker's host hangs; `kill` then ends it.
    pub fn pause(&self) {
        let ok = Command::new("kill")
            .args(["-STOP", &self.child.id().to_string()])
            .status()
            .expect("kill -STOP");
        assert!(ok.success(), "kill -STOP mosquitto");
    }

    /// Kills it, keeping its directory for a restart.
    pub fn kill(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = tempfile::tempdir().expect("tempdir");
        std::mem::replace(&mut self.dir, dir)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Copies a directory tree (a sysfs fixture the test then heats up).
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read fixture") {
        let e = e.expect("entry");
        let dest = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).expect("copy");
        }
    }
}

/// A `fieldllmd serve` process with a config file; stopped (SIGTERM, then kill) on drop.
pub struct Daemon {
    child: std::process::Child,
    /// Directory with its config and its log (`daemon.log`).
    pub dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `fieldllmd serve --config` with this TOML text.
    pub fn start(config: &str) -> Daemon {
        Daemon::start_with_env(config, &[])
    }

    /// Starts it with extra environment variables (`NOTIFY_SOCKET`).
    pub fn start_with_env(config: &str, env: &[(&str, &std::ffi::OsStr)]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("fieldllmd.toml");
        std::fs::write(&conf, config).expect("write config");
        let child = Command::new(fieldllmd())
            .arg("serve")
            .arg("--config")
            .arg(&conf)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info,tract_onnx=error")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("daemon.log")).expect("log"))
            .spawn()
            .expect("start fieldllmd serve");
        Daemon { child, dir }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Waits up to `wait` for the process to exit on its own.
    pub fn wait_exit(&mut self, wait: std::time::Duration) -> Option<std::process::ExitStatus> {
        let until = std::time::Instant::now() + wait;
        while std::time::Instant::now() < until {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        None
    }

    /// Waits until its log contains `needle` (panics with the log after `wait`).
    pub fn wait_log(&self, needle: &str, wait: std::time::Duration) {
        let until = std::time::Instant::now() + wait;
        while !self.log().contains(needle) {
            assert!(
                std::time::Instant::now() < until,
                "{needle:?} not in the daemon log:\n{}",
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Kills it (SIGKILL: no clean stop, as a power cut or the OOM killer would).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits until a line of its log holds every one of `needles`; returns that line (panics
    /// with the log after `wait`).
    pub fn wait_line(&self, needles: &[&str], wait: std::time::Duration) -> String {
        let until = std::time::Instant::now() + wait;
        loop {
            let log = self.log();
            if let Some(l) = log.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return l.to_string();
            }
            assert!(
                std::time::Instant::now() < until,
                "no line with {needles:?} in the daemon log:\n{log}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().expect("wait for fieldllmd")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // the failed test's output then says what the daemon was doing
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- the daemon's last log lines ---");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .status();
            for _ in 0..100 {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
