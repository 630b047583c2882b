//! A device talking to fieldllmd over a serial line in framed mode: sends one question and
//! prints the answer as its chunks arrive.
//!
//!     cargo run -p fieldllm-proto --example framed_client -- /dev/ttyUSB0 "Why does the pump cavitate?"
//!
//! Frame on the wire: COBS( kind u8 | protobuf body | CRC-32 of kind+body, little-endian ) 0x00.

use std::io::Write as _;
use std::time::Duration;

use fieldllm_proto::Request;
use fieldllm_proto::frame::{self, Feed, Frame, Reader};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_serial::SerialPortBuilderExt;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(path), Some(question)) = (args.next(), args.next()) else {
        eprintln!("usage: framed_client PORT QUESTION [BAUD]");
        std::process::exit(2);
    };
    let baud = args.next().map_or(Ok(115_200), |b| b.parse())?;
    let mut port = tokio_serial::new(path, baud).open_native_async()?;

    let id = format!("dev-{}", std::process::id());
    let request = Frame::Request(Request {
        id: id.clone(),
        prompt: question,
        stream: Some(true),
        ..Request::default()
    });
    // a leading delimiter ends whatever half frame the line held before us
    AsyncWriteExt::write_all(&mut port, &[frame::DELIMITER]).await?;
    AsyncWriteExt::write_all(&mut port, &frame::encode(&request)?).await?;

    let mut reader = Reader::new();
    let mut buf = [0u8; 512];
    let mut out = std::io::stdout();
    loop {
        let n = tokio::time::timeout(Duration::from_secs(60), port.read(&mut buf)).await??;
        let mut input = &buf[..n];
        while let (Some(found), rest) = reader.feed(input) {
            input = rest;
            match found {
                Feed::Frame(Frame::Chunk(c)) if c.id == id => {
                    write!(out, "{}", c.text)?;
                    out.flush()?;
                }
                Feed::Frame(Frame::Done(d)) if d.id == id => {
                    let usage = d.usage.unwrap_or_default();
                    println!();
                    eprintln!(
                        "[{} tokens, finish {:?}]",
                        usage.completion_tokens,
                        fieldllm_proto::FinishReason::try_from(d.finish_reason)
                    );
                    return Ok(());
                }
                Feed::Frame(Frame::Error(e)) => {
                    eprintln!("error from the appliance ({}): {}", e.code, e.message);
                    if e.id == id {
                        std::process::exit(1);
                    }
                }
                Feed::Frame(_) => {}
                Feed::Error(e) => eprintln!("dropped a bad frame: {e}"),
            }
        }
    }
}
