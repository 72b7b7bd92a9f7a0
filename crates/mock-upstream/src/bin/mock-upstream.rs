//! `mock-upstream`: runs the mock upstream as a standalone server for the demo and benchmarks.
//!
//! ```text
//! mock-upstream [--listen ADDR] [--delay-ms N] [--body-bytes N]
//! ```
//!
//! Prints `listening on http://ADDR` once bound and serves until Ctrl-C.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use mock_upstream::{DEFAULT_BODY_BYTES, MockUpstream};

const USAGE: &str = "usage: mock-upstream [--listen ADDR] [--delay-ms N] [--body-bytes N]

  --listen ADDR     address to listen on (default 127.0.0.1:9090)
  --delay-ms N      every response waits N milliseconds (default 0)
  --body-bytes N    pad the JSON body to about N bytes (default 600)";

struct Args {
    listen: SocketAddr,
    delay_ms: u64,
    body_bytes: usize,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut parsed = Args {
        listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
        delay_ms: 0,
        body_bytes: DEFAULT_BODY_BYTES,
    };
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg, None),
        };
        if flag == "-h" || flag == "--help" {
            return Ok(None);
        }
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--listen" => {
                let v = value()?;
                parsed.listen = v.parse().map_err(|e| format!("--listen {v:?}: {e}"))?;
            }
            "--delay-ms" => {
                let v = value()?;
                parsed.delay_ms = v.parse().map_err(|e| format!("--delay-ms {v:?}: {e}"))?;
            }
            "--body-bytes" => {
                let v = value()?;
                parsed.body_bytes = v.parse().map_err(|e| format!("--body-bytes {v:?}: {e}"))?;
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Some(parsed))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("mock-upstream: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mock = match MockUpstream::start_on(args.listen).await {
        Ok(mock) => mock,
        Err(e) => {
            eprintln!("mock-upstream: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    mock.set_delay(Duration::from_millis(args.delay_ms));
    mock.set_body_bytes(args.body_bytes);
    println!("listening on {}", mock.url());
    if let Err(e) = tokio::signal::ctrl_c().await {
        eprintln!("mock-upstream: waiting for Ctrl-C failed: {e}");
        return ExitCode::FAILURE;
    }
    eprintln!("mock-upstream: {} calls served", mock.calls());
    mock.shutdown();
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<Args>, String> {
        parse_args(args.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn parses_flags() {
        let a = parse(&[]).unwrap().unwrap();
        assert_eq!(a.listen, SocketAddr::from(([127, 0, 0, 1], 9090)));
        assert_eq!((a.delay_ms, a.body_bytes), (0, DEFAULT_BODY_BYTES));

        let a = parse(&[
            "--listen",
            "127.0.0.1:0",
            "--delay-ms",
            "20",
            "--body-bytes=4096",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(a.listen.port(), 0);
        assert_eq!((a.delay_ms, a.body_bytes), (20, 4096));

        assert!(parse(&["--help"]).unwrap().is_none());
        assert!(parse(&["--delay-ms"]).is_err());
        assert!(parse(&["--delay-ms", "soon"]).is_err());
        assert!(parse(&["--listen", "nowhere"]).is_err());
        assert!(parse(&["--bogus"]).is_err());
    }
}
