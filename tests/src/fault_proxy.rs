//! A loopback TCP proxy that injects network faults between an agent and
//! its hub: a silent partition (connections stay open, nothing gets
//! through until it heals, as TCP retransmission would deliver it), a
//! refusal (every connection reset, new ones refused) and a reset of the
//! live connections.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward everything.
    Pass,
    /// Forward nothing, close nothing: a silent partition. Data sent
    /// meanwhile is delivered once the mode returns to `Pass`.
    Blackhole,
    /// Close every connection and refuse new ones: a dead peer.
    Refuse,
}

pub struct FaultProxy {
    addr: SocketAddr,
    mode: Arc<watch::Sender<Mode>>,
    /// Cancelled (and replaced) to reset the live connections.
    generation: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
}

impl FaultProxy {
    /// Listens on `127.0.0.1:0` and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fault proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (mode, _) = watch::channel(Mode::Pass);
        let proxy = FaultProxy {
            addr,
            mode: Arc::new(mode),
            generation: Arc::default(),
            stop: CancellationToken::new(),
        };
        let mode = proxy.mode.clone();
        let stop = proxy.stop.clone();
        let generation = proxy.generation.clone();
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    () = stop.cancelled() => return,
                    r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                };
                if *mode.borrow() == Mode::Refuse {
                    drop(client);
                    continue;
                }
                let conn_stop = generation.lock().unwrap().clone();
                let mode = mode.subscribe();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        () = pump(cr, sw, mode.clone()) => {}
                        () = pump(sr, cw, mode) => {}
                        () = conn_stop.cancelled() => {}
                    }
                });
            }
        });
        proxy
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR` (or `https://` with `tls`) for clients.
    pub fn url(&self, tls: bool) -> String {
        format!("{}://{}", if tls { "https" } else { "http" }, self.addr)
    }

    pub fn set(&self, mode: Mode) {
        if mode == Mode::Refuse {
            self.reset();
        }
        self.mode.send_replace(mode);
    }

    /// Closes every live connection (new ones are accepted as the mode says).
    pub fn reset(&self) {
        let old = std::mem::take(&mut *self.generation.lock().unwrap());
        old.cancel();
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.generation.lock().unwrap().cancel();
    }
}

/// Copies `from` to `to` while the mode allows; holds data during a
/// blackhole; returns when either side closes or the mode is `Refuse`.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        loop {
            let m = *mode.borrow_and_update();
            match m {
                Mode::Pass => break,
                Mode::Refuse => return,
                Mode::Blackhole => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
