//! The console on the daemon's own terminal: `fieldllmd serve` started from a shell gives the
//! person at that shell the same console a serial port gives a technician.
//!
//! The terminal is opened as `/dev/tty`, switched to non-canonical mode without echo or
//! signal keys (Ctrl-C then reaches the console as a byte and cancels an answer instead of
//! killing the daemon), and restored when the console ends, also on error.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use nix::sys::termios::{self, InputFlags, LocalFlags, SetArg, SpecialCharacterIndices, Termios};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The controlling terminal in console mode; restores its settings on drop.
pub struct Tty {
    fd: AsyncFd<File>,
    saved: Termios,
}

impl Tty {
    /// Opens `/dev/tty` (fails when the process has no terminal).
    pub fn open() -> io::Result<Tty> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_NOCTTY | nix::libc::O_NONBLOCK)
            .open("/dev/tty")?;
        let saved = termios::tcgetattr(&file)?;
        let mut t = saved.clone();
        t.local_flags &=
            !(LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::ISIG | LocalFlags::IEXTEN);
        t.input_flags &= !(InputFlags::IXON | InputFlags::ICRNL | InputFlags::INLCR);
        // output processing stays on: log lines on stderr keep their carriage returns
        t.control_chars[SpecialCharacterIndices::VMIN as usize] = 1;
        t.control_chars[SpecialCharacterIndices::VTIME as usize] = 0;
        termios::tcsetattr(&file, SetArg::TCSANOW, &t)?;
        // `new` is deprecated for types whose fd can change under the registration; a File
        // owned by the AsyncFd keeps its fd until both are dropped, and `register` is unsafe
        #[allow(deprecated)]
        let fd = AsyncFd::new(file)?;
        Ok(Tty { fd, saved })
    }
}

impl Drop for Tty {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(self.fd.get_ref(), SetArg::TCSANOW, &self.saved);
    }
}

impl AsyncRead for Tty {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|f| f.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for Tty {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|f| f.get_ref().write(data)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
