//! Serial helpers of the end-to-end tests: a null-modem cable made of two pseudo-terminals
//! (socat), and the far end of it as a tokio-serial port with a byte log to wait on.

#![allow(clippy::unwrap_used)] // test harness: a failed unwrap is a failed assertion

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fieldllmd::transport::serial::frame::{Feed, Frame, Reader};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_serial::SerialPortBuilderExt;

/// Two linked pseudo-terminals: `dev` for the daemon, `host` for the test (or picocom).
pub struct NullModem {
    /// The daemon's end (a symlink to /dev/pts/N).
    pub dev: PathBuf,
    /// The other end.
    pub host: PathBuf,
    child: Child,
}

impl NullModem {
    /// Starts socat with links in `dir` and waits for both ends.
    pub fn start(dir: &Path) -> NullModem {
        let dev = dir.join("dev");
        let host = dir.join("host");
        let child = Command::new("socat")
            .arg(format!("pty,raw,echo=0,link={}", dev.display()))
            .arg(format!("pty,raw,echo=0,link={}", host.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat (apt-get install socat)");
        let until = Instant::now() + Duration::from_secs(10);
        while !(dev.exists() && host.exists()) {
            assert!(Instant::now() < until, "socat made no ptys");
            std::thread::sleep(Duration::from_millis(20));
        }
        NullModem { dev, host, child }
    }

    /// Pulls the cable: socat dies and both ends vanish.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let until = Instant::now() + Duration::from_secs(5);
        while self.dev.exists() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_file(&self.dev);
        let _ = std::fs::remove_file(&self.host);
    }
}

impl Drop for NullModem {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test's end of the cable.
pub struct Terminal {
    port: tokio_serial::SerialStream,
    /// Everything read so far.
    pub seen: Vec<u8>,
    /// Bytes of `seen` already consumed by `until`.
    pub mark: usize,
}

impl Terminal {
    /// Opens `path` at 115200 8N1.
    pub fn open(path: &Path) -> Terminal {
        let port = tokio_serial::new(path.to_string_lossy(), 115_200)
            .open_native_async()
            .expect("open the host end");
        Terminal {
            port,
            seen: Vec::new(),
            mark: 0,
        }
    }

    /// Writes bytes.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.port.write_all(bytes).await.unwrap();
        self.port.flush().await.unwrap();
    }

    /// Reads until `needle` appears after the mark; moves the mark past it; returns the text
    /// between. Panics with what was seen after `wait`.
    pub async fn until(&mut self, needle: &[u8], wait: Duration) -> Vec<u8> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(i) = find(&self.seen[self.mark..], needle) {
                let start = self.mark;
                self.mark += i + needle.len();
                return self.seen[start..self.mark].to_vec();
            }
            let mut buf = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.port.read(&mut buf)).await {
                Ok(Ok(n)) => self.seen.extend_from_slice(&buf[..n]),
                Ok(Err(e)) => panic!(
                    "read: {e}; seen {:?}",
                    String::from_utf8_lossy(&self.seen[self.mark..])
                ),
                Err(_) => panic!(
                    "{:?} not seen in {wait:?}; after the mark: {:?}",
                    String::from_utf8_lossy(needle),
                    String::from_utf8_lossy(&self.seen[self.mark..])
                ),
            }
        }
    }

    /// Waits for the next bytes after the mark (an answer has begun streaming, say); returns
    /// them and moves the mark past them. Panics after `wait`.
    pub async fn more(&mut self, wait: Duration) -> Vec<u8> {
        if self.seen.len() == self.mark {
            let mut buf = [0u8; 4096];
            match tokio::time::timeout(wait, self.port.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => self.seen.extend_from_slice(&buf[..n]),
                other => panic!("nothing more in {wait:?}: {other:?}"),
            }
        }
        let out = self.seen[self.mark..].to_vec();
        self.mark = self.seen.len();
        out
    }

    /// Reads whatever arrives within `wait`.
    pub async fn drain(&mut self, wait: Duration) -> Vec<u8> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut buf = [0u8; 4096];
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, self.port.read(&mut buf)).await {
            if n == 0 {
                break;
            }
            self.seen.extend_from_slice(&buf[..n]);
        }
        let out = self.seen[self.mark..].to_vec();
        self.mark = self.seen.len();
        out
    }
}

/// First index of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A detached tmux server of its own running one program in a real terminal; killed on drop.
pub struct Tmux {
    socket: String,
}

impl Tmux {
    /// Starts `command` in a `cols` x `rows` terminal.
    pub fn start(name: &str, cols: u16, rows: u16, command: &[&str]) -> Tmux {
        let t = Tmux {
            socket: format!("fieldllm-{name}-{}", std::process::id()),
        };
        let (cols, rows) = (cols.to_string(), rows.to_string());
        let mut args = vec!["new-session", "-d", "-x", &cols, "-y", &rows];
        args.extend_from_slice(command);
        let o = t.run(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        t
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("tmux (apt-get install tmux)")
    }

    /// Types keys (tmux key names: `Enter`, `C-c`, or text).
    pub fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys"];
        args.extend_from_slice(keys);
        self.run(&args);
    }

    /// Waits until the screen (and 100 lines of scrollback) shows `needle`; returns it.
    pub fn wait_for(&self, needle: &str, wait: Duration) -> String {
        let until = Instant::now() + wait;
        loop {
            let s =
                String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-S", "-100"]).stdout)
                    .into_owned();
            if s.contains(needle) {
                return s;
            }
            assert!(Instant::now() < until, "{needle:?} not on screen:\n{s}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// Reads frames from the host end until `last` says a frame is the last wanted; returns the
/// frames read, up to the end of that read (every byte read is fed, so none is lost between
/// calls).
pub async fn until_frame(
    port: &mut tokio_serial::SerialStream,
    reader: &mut Reader,
    mut last: impl FnMut(&Frame) -> bool,
) -> Vec<Frame> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let mut done = false;
    while !done {
        let n = tokio::time::timeout(crate::mqtt::WAIT, port.read(&mut buf))
            .await
            .expect("frames in time")
            .unwrap();
        let mut input = &buf[..n];
        loop {
            let (f, rest) = reader.feed(input);
            input = rest;
            match f {
                Some(Feed::Frame(f)) => {
                    done = done || last(&f);
                    out.push(f);
                }
                Some(Feed::Error(e)) => {
                    panic!("the daemon sent a bad frame: {e}")
                }
                None => break,
            }
        }
    }
    out
}
