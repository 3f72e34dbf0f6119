//! Ports for the servers tests start on an address chosen beforehand (PostgreSQL, Garage,
//! chromedriver, an agent's inference API), which cannot be told to bind port 0 and say which
//! port they got.
//!
//! A port the kernel handed to `bind("127.0.0.1:0")` and that was let go at once is not safe for
//! them: it comes from the ephemeral range, where every outgoing connection of every test running
//! beside takes its local port too, and every other `bind` to port 0. One of them can take it
//! before the server binds it (the server then fails with "address in use"), or while the server
//! is stopped for a restart, or, worse, a server of another test can take it and answer in its
//! place. So [`free_port`] picks below the ephemeral range, where the kernel never hands out
//! ports by itself, walking a sequence of its own so that one test process never hands out a
//! port twice, and started at an offset of the process id, so that processes running at once
//! start apart.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest port [`free_port`] hands out: above the well-known and most registered services'.
const LOWEST: u16 = 20_000;

/// Where the kernel's ephemeral range starts when `/proc` does not say (Linux's default).
const DEFAULT_EPHEMERAL_START: u16 = 32_768;

/// How many ports [`free_port`] tries before it gives up.
const ATTEMPTS: u32 = 1_000;

/// The calls so far in this process.
static CALLS: AtomicU32 = AtomicU32::new(0);

/// A port of 127.0.0.1 below the kernel's ephemeral range that was free when this returned and
/// that no other call in this process has returned (until the range's ports are all used once).
pub fn free_port() -> Result<u16, String> {
    free_port_after(&CALLS)
}

/// [`free_port`], counting its calls in `calls`.
fn free_port_after(calls: &AtomicU32) -> Result<u16, String> {
    let end = range_end();
    let mut last_error = None;
    for _ in 0..ATTEMPTS {
        let port = candidate(calls.fetch_add(1, Ordering::Relaxed), end);
        match TcpListener::bind(("127.0.0.1", port)) {
            Ok(_) => return Ok(port),
            Err(error) => last_error = Some(error),
        }
    }
    Err(format!(
        "finding a free port of 127.0.0.1 in {LOWEST}..{end}: {ATTEMPTS} tried, the last \
         refused with {}",
        last_error.map_or_else(|| "nothing".to_owned(), |error| error.to_string())
    ))
}

/// The port call number `call` of this process tries, in `LOWEST..end`.
fn candidate(call: u32, end: u16) -> u16 {
    let span = u32::from(end - LOWEST);
    let offset = std::process::id().wrapping_mul(7_919);
    LOWEST + u16::try_from(offset.wrapping_add(call) % span).unwrap_or(0)
}

/// Where the ports [`free_port`] hands out end: the start of the ephemeral range, or a
/// thousand ports above [`LOWEST`] if that range starts lower.
fn range_end() -> u16 {
    ephemeral_start().max(LOWEST + 1_000)
}

/// The first port of the kernel's ephemeral range, from `/proc/sys/net/ipv4/ip_local_port_range`.
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(DEFAULT_EPHEMERAL_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_below_the_ephemeral_range_free_and_never_handed_out_twice() {
        let ephemeral = ephemeral_start();
        assert!(
            ephemeral > LOWEST + 1_000,
            "this machine's ephemeral range starts at {ephemeral}"
        );
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let port = free_port().unwrap();
            assert!((LOWEST..ephemeral).contains(&port), "{port}");
            assert!(seen.insert(port), "{port} handed out twice");
            TcpListener::bind(("127.0.0.1", port)).unwrap();
        }
    }

    #[test]
    fn a_port_a_server_holds_is_passed_over() {
        // A sequence of its own, far from the process's, whose next candidate a server holds.
        let calls = AtomicU32::new(5_000);
        let end = range_end();
        let next = candidate(5_000, end);
        let _held = TcpListener::bind(("127.0.0.1", next)).unwrap();
        let port = free_port_after(&calls).unwrap();
        assert_ne!(port, next);
        assert_eq!(port, candidate(5_001, end));
    }
}
