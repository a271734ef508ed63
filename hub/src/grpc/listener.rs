//! The gRPC listener: accepts connections (TLS when configured), serves
//! each with hyper's HTTP/2 server and homes it on the runtime its callers
//! need.
//!
//! Agents' connections carry the long sessions and are served on the
//! hub's main runtime, where one commit's fan-out wakes thousands of them
//! at once. A connection served there waits behind those wake-ups at each
//! step of a call (reading the request, running it, writing the reply): an
//! operator's commit that takes half a millisecond in the store took
//! ~20 ms at 1,000 agents and ~240 ms at 10,000. Which service a
//! connection is for shows only in its first request, so every connection
//! starts on the main runtime and the first call to anything but
//! `AgentService` moves it, with every call it carries from then on, to
//! the control lane ([`crate::lane`]): its task, its calls and its socket
//! (registered again with the lane's reactor). An operator waits behind
//! the fan-out only for its TLS handshake and first request.

use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tonic::service::Routes;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The path prefix of the agents' service; calls to anything else are an
/// operator's.
const AGENT_SERVICE: &str = "/unitsync.v1.AgentService/";

/// A TLS handshake that takes longer is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP/2 settings of every connection.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Ping interval, and how long a ping may go unanswered.
    pub keepalive: Duration,
    pub max_concurrent_streams: u32,
}

/// Serves `routes` on `listener` until `stop` completes, then lets every
/// open connection finish gracefully (their streams must end: the caller
/// ends the agent sessions) and returns once all are closed.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    tls: Option<Arc<rustls::ServerConfig>>,
    settings: Settings,
    control: Handle,
    stop: impl Future<Output = ()>,
) {
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    let routes = routes.prepare();
    // Every connection holds a receiver: the sender learns when all are
    // gone.
    let (closing, open) = tokio::sync::watch::channel(());
    let mut stop = pin!(stop);
    loop {
        let tcp = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors, say: do not spin.
                    tracing::debug!(error = %e, "gRPC accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let home = Arc::new(Home {
            control: control.clone(),
            operator: AtomicBool::new(false),
            moved: AtomicBool::new(false),
        });
        let tcp = Rehoming::new(tcp, home.clone());
        let connection = Connection {
            routes: routes.clone(),
            settings,
            home,
            closing: open.clone(),
        };
        match &tls {
            None => connection.spawn(tcp),
            Some(acceptor) => {
                let handshake = acceptor.accept(tcp);
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                        Ok(Ok(stream)) => connection.spawn(stream),
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                });
            }
        }
    }
    // Stop accepting at once (the port refuses new clients), then drain.
    drop(listener);
    let _ = closing.send(());
    drop(open);
    closing.closed().await;
}

/// One accepted connection, before it is served.
struct Connection {
    routes: Routes,
    settings: Settings,
    home: Arc<Home>,
    closing: tokio::sync::watch::Receiver<()>,
}

impl Connection {
    /// Serves the connection in a task of its own on the current (main)
    /// runtime, until its first operator call moves it.
    fn spawn<IO>(self, io: IO)
    where
        IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    {
        let home = self.home.clone();
        tokio::spawn(Homed {
            served: Some(Box::pin(self.serve(io))),
            home,
        });
    }

    async fn serve<IO>(self, io: IO)
    where
        IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    {
        let Connection {
            routes,
            settings,
            home,
            mut closing,
        } = self;
        let service = Homing {
            routes,
            info: io.connect_info(),
            home: home.clone(),
        };
        let mut http2 = hyper::server::conn::http2::Builder::new(Spawner {
            home,
            main: Handle::current(),
        });
        http2
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(settings.keepalive))
            .keep_alive_timeout(settings.keepalive)
            .max_concurrent_streams(settings.max_concurrent_streams);
        let mut conn =
            pin!(http2.serve_connection(TokioIo::new(io), TowerToHyperService::new(service)));
        let mut draining = false;
        loop {
            tokio::select! {
                served = &mut conn => {
                    if let Err(e) = served {
                        tracing::debug!(error = %e, "gRPC connection ended");
                    }
                    return;
                }
                _ = closing.changed(), if !draining => {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// Where a connection is served: the main runtime until its first
/// operator call, the control lane from then on.
struct Home {
    control: Handle,
    /// Set by the first operator call: the connection is to move.
    operator: AtomicBool,
    /// Set once the connection's task is handed to the control lane.
    moved: AtomicBool,
}

impl Home {
    fn on_control(&self) -> bool {
        self.operator.load(Ordering::Acquire)
    }
}

/// A connection's future: polled where it was spawned until its home
/// moves to the control lane, then handed to a task there (whose first
/// poll registers the new task's waker with everything it waits on).
struct Homed {
    served: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    home: Arc<Home>,
}

impl Future for Homed {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(served) = self.served.as_mut() else {
            return Poll::Ready(());
        };
        if served.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        if self.home.on_control()
            && let Some(served) = self.served.take()
        {
            self.home.moved.store(true, Ordering::Release);
            self.home.control.spawn(served);
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// Runs a connection's calls (hyper's stream tasks) where the connection
/// lives.
#[derive(Clone)]
struct Spawner {
    home: Arc<Home>,
    main: Handle,
}

impl<F> hyper::rt::Executor<F> for Spawner
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, call: F) {
        if self.home.on_control() {
            self.home.control.spawn(call);
        } else {
            self.main.spawn(call);
        }
    }
}

/// The per-connection service: gives each request the connection's
/// address and TLS session (as tonic's own server does, for
/// `Request::peer_certs`) and sends the connection home to the control
/// lane at its first operator call.
#[derive(Clone)]
struct Homing<I> {
    routes: Routes,
    info: I,
    home: Arc<Home>,
}

impl<I, B> tower::Service<http::Request<B>> for Homing<I>
where
    I: Clone + Send + Sync + 'static,
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = <Routes as tower::Service<http::Request<B>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::<http::Request<B>>::poll_ready(&mut self.routes, cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        if !req.uri().path().starts_with(AGENT_SERVICE) {
            // Before hyper spawns this call: it runs on the control lane.
            self.home.operator.store(true, Ordering::Release);
        }
        req.extensions_mut().insert(self.info.clone());
        self.routes.call(req)
    }
}

/// A connection's socket, registered again with the reactor of the
/// runtime it is polled on once its connection has moved there (the
/// main runtime's reactor is polled only between its tasks).
struct Rehoming {
    tcp: Option<TcpStream>,
    info: TcpConnectInfo,
    home: Arc<Home>,
    rehomed: bool,
}

impl Rehoming {
    fn new(tcp: TcpStream, home: Arc<Home>) -> Rehoming {
        Rehoming {
            info: tcp.connect_info(),
            tcp: Some(tcp),
            home,
            rehomed: false,
        }
    }

    /// The socket, on the reactor of the runtime polling it.
    fn tcp(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        if !self.rehomed && self.home.moved.load(Ordering::Acquire) {
            self.rehomed = true;
            if let Some(tcp) = self.tcp.take() {
                // Polled by the moved connection's task: the lane's reactor.
                self.tcp = Some(TcpStream::from_std(tcp.into_std()?)?);
            }
        }
        match self.tcp.as_mut() {
            Some(tcp) => Ok(Pin::new(tcp)),
            None => Err(io::Error::other("the connection was lost while moving")),
        }
    }
}

impl Connected for Rehoming {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for Rehoming {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut().tcp()?.poll_read(cx, buf)
    }
}

impl AsyncWrite for Rehoming {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().tcp()?.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().tcp()?.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().tcp()?.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().tcp()?.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_call_that_is_not_an_agents_moves_the_connection() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _rt = rt.enter();
        let home = Arc::new(Home {
            control: rt.handle().clone(),
            operator: AtomicBool::new(false),
            moved: AtomicBool::new(false),
        });
        let mut homing = Homing {
            routes: Routes::default(),
            info: (),
            home: home.clone(),
        };
        let request = |path: &str| {
            http::Request::builder()
                .uri(path)
                .body(tonic::body::Body::empty())
                .unwrap()
        };
        drop(tower::Service::call(
            &mut homing,
            request("/unitsync.v1.AgentService/Session"),
        ));
        assert!(!home.on_control());
        drop(tower::Service::call(
            &mut homing,
            request("/unitsync.v1.HubService/PutUnit"),
        ));
        assert!(home.on_control());
    }
}
