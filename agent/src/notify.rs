//! systemd's notification protocol (`sd_notify`): READY, WATCHDOG and STOPPING datagrams to the
//! socket named by `$NOTIFY_SOCKET`. Without that variable (not under systemd) every call is a
//! no-op, so the same binary runs anywhere.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

#[derive(Debug)]
pub struct Notifier {
    socket: Option<(UnixDatagram, String)>,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let socket = std::env::var("NOTIFY_SOCKET").ok().and_then(|path| {
            // Abstract sockets (leading '@') are not reachable through a std path; systemd uses a
            // filesystem socket for services unless configured otherwise.
            if path.starts_with('@') {
                log::warn!("NOTIFY_SOCKET {path} is an abstract socket; notifications disabled");
                return None;
            }
            UnixDatagram::unbound().ok().map(|socket| (socket, path))
        });
        Notifier { socket }
    }

    fn send(&self, message: &str) {
        if let Some((socket, path)) = &self.socket {
            if let Err(error) = socket.send_to(message.as_bytes(), path) {
                log::warn!("sd_notify {message:?} failed: {error}");
            }
        }
    }

    pub fn ready(&self) {
        self.send("READY=1");
    }

    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    pub fn status(&self, text: &str) {
        self.send(&format!("STATUS={text}"));
    }

    /// Half the watchdog interval systemd asked for, if any: how often to ping.
    pub fn watchdog_interval() -> Option<Duration> {
        let micros: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        Some(Duration::from_micros(micros / 2)).filter(|interval| !interval.is_zero())
    }
}
