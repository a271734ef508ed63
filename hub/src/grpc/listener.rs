//! The gRPC listener: accepts connections (TLS when configured), serves
//! each with hyper's HTTP/2 server and homes it on the runtime its callers
//! need.
//!
//! Agents' connections carry the long sessions and are served on the
//! hub's main runtime, where one commit's fan-out wakes thousands of them
//! at once. A connection served there waits behind those wake-ups at each
//! step (accepting it, its handshake, reading a request, running it,
//! writing the reply): an operator's commit that takes half a millisecond
//! in the store took ~20 ms at 1,000 agents and ~240 ms at 10,000. Which
//! service a connection is for shows only in its first request, so every
//! connection is accepted, TLS-terminated and read on a lane of its own
//! (the accept lane, [`crate::lane`]) and its first call sends it home:
//! `AgentService` to the main runtime, anything else to the control lane.
//! The move takes the connection's task, its calls, its socket (registered
//! again with the new runtime's reactor) and its keepalive timer (made
//! again on the new runtime's timer).
//!
//! A TLS client names its role in the ClientHello
//! ([`unitsync_proto::dial`]: agents and the CLI do). The accept lane reads
//! every ClientHello and sends an operator's connection to the control lane
//! before the handshake's work, so that it does not queue behind a
//! reconnect storm's ten thousand agents' handshakes. Agents' handshakes
//! (and those of clients that name no role) stay on the accept lane:
//! handshaken on the main runtime instead, a storm of 10,000 took 15-20%
//! longer and more CPU (more threads contending for two cores, the
//! sessions' store reads sooner in each other's way). The role is
//! unauthenticated (a hint), so at most [`CONTROL_HANDSHAKES`] handshakes
//! run on the control lane at once; more operators' (a flood of
//! ClientHellos claiming the role, say) are handshaken on the accept lane,
//! and a flood cannot queue unbounded work ahead of operators' calls. The
//! first call still decides where a connection is served.
//!
//! A connection has one home: behind an HTTP/2 proxy that carries
//! operators' calls and agents' sessions on one upstream connection, they
//! share the home of its first call. A call's deadline (`grpc-timeout`)
//! bounds its reply: past it the caller hears `DEADLINE_EXCEEDED` (a
//! write the hub has begun still completes: see [`crate::grpc::operator`]).
use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use hyper_util::service::{TowerToHyperService, TowerToHyperServiceFuture};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tonic::service::Routes;
use tonic::transport::server::{Connected, TcpConnectInfo};
use unitsync_proto::dial::Role;

/// The agents' service; calls to anything else are an operator's.
const AGENT_SERVICE: &str = <unitsync_proto::session::agent_service_server::AgentServiceServer<
    crate::grpc::agent::AgentService,
> as tonic::server::NamedService>::NAME;

/// A TLS handshake that takes longer is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Operators' handshakes under way on the control lane at most; further
/// ones are done on the accept lane.
const CONTROL_HANDSHAKES: usize = 8;

/// How long connections may take to finish their calls once shutdown
/// began; those still busy then are closed.
pub const DRAIN: Duration = Duration::from_secs(5);

/// HTTP/2 settings of every connection.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Ping interval, and how long a ping may go unanswered.
    pub keepalive: Duration,
    pub max_concurrent_streams: u32,
}

/// The runtimes connections are homed on.
#[derive(Clone, Debug)]
pub struct Homes {
    /// Agents' connections (the hub's main runtime).
    pub sessions: Handle,
    /// Everything else: operators (the control lane).
    pub control: Handle,
}

impl Homes {
    /// Where a role's connections are served.
    fn of(&self, role: Role) -> &Handle {
        match role {
            Role::Agent => &self.sessions,
            Role::Operator => &self.control,
        }
    }
}

/// Serves `routes` on `listener` until `stop` completes, then lets every
/// open connection finish gracefully (their streams must end: the caller
/// ends the agent sessions and the watches) and returns once all are
/// closed, or after [`DRAIN`], closing those still busy. Runs on the
/// accept lane: connections stay there until their first call.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    tls: Option<Arc<rustls::ServerConfig>>,
    settings: Settings,
    homes: Homes,
    stop: impl Future<Output = ()>,
) {
    let routes = routes.prepare();
    let control_handshakes = Arc::new(Semaphore::new(CONTROL_HANDSHAKES));
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
        let home = Arc::new(Home::new(homes.clone()));
        let tcp = Rehoming::new(tcp, home.clone());
        let connection = Connection {
            routes: routes.clone(),
            settings,
            home,
            closing: open.clone(),
        };
        match &tls {
            None => connection.spawn(tcp),
            Some(config) => drop(tokio::spawn(connection.accept_tls(
                tcp,
                config.clone(),
                control_handshakes.clone(),
            ))),
        }
    }
    // Stop accepting at once (the port refuses new clients), then drain.
    drop(listener);
    let _ = closing.send(());
    drop(open);
    if tokio::time::timeout(DRAIN, closing.closed()).await.is_err() {
        tracing::warn!(
            connections = closing.receiver_count(),
            "gRPC connections still busy {}s after shutdown began; closing them",
            DRAIN.as_secs()
        );
        let _ = closing.send(());
        closing.closed().await;
    }
}

/// One accepted connection, before it is served.
struct Connection {
    routes: Routes,
    settings: Settings,
    home: Arc<Home>,
    closing: tokio::sync::watch::Receiver<()>,
}

impl Connection {
    /// Reads the ClientHello here (the accept lane), then handshakes an
    /// operator's connection on the control lane (if one of its
    /// `control_handshakes` is free) and any other here, and serves the
    /// connection from there.
    async fn accept_tls(
        self,
        tcp: Rehoming,
        config: Arc<rustls::ServerConfig>,
        control_handshakes: Arc<Semaphore>,
    ) {
        let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
        let mut closing = self.closing.clone();
        let hello = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
        let hello = tokio::select! {
            hello = tokio::time::timeout_at(deadline, hello) => hello,
            // The hub is stopping: no new connection.
            _ = closing.changed() => return,
        };
        let start = match hello {
            Ok(Ok(start)) => start,
            Ok(Err(e)) => return tracing::debug!(error = %e, "TLS handshake failed"),
            Err(_) => return tracing::debug!("TLS handshake timed out"),
        };
        let operator =
            start.client_hello().alpn().and_then(Role::from_alpn) == Some(Role::Operator);
        let slot = operator
            .then(|| control_handshakes.try_acquire_owned().ok())
            .flatten();
        let on_control = slot.is_some();
        let home = self.home.clone();
        let handshake = async move {
            let mut closing = self.closing.clone();
            let shaken = tokio::select! {
                shaken = tokio::time::timeout_at(deadline, start.into_stream(config)) => shaken,
                _ = closing.changed() => return,
            };
            drop(slot);
            match shaken {
                Ok(Ok(stream)) => self.spawn(stream),
                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!("TLS handshake timed out"),
            }
        };
        if on_control {
            // The socket follows on its next poll (see `Rehoming`).
            home.moves.fetch_add(1, Ordering::Release);
            drop(home.homes.control.spawn(handshake));
        } else {
            handshake.await;
        }
    }

    /// Serves the connection in a task of its own where it is (the accept
    /// lane, or the control lane for an operator), until its first call
    /// sends it home.
    fn spawn<IO>(self, io: IO)
    where
        IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    {
        let home = self.home.clone();
        tokio::spawn(Homed {
            served: Some(Box::pin(self.serve(io))),
            home,
            settled: false,
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
            routes: TowerToHyperService::new(routes),
            info: io.connect_info(),
            home: home.clone(),
        };
        let mut http2 = hyper::server::conn::http2::Builder::new(Spawner(home));
        http2
            .timer(HomeTimer)
            .keep_alive_interval(Some(settings.keepalive))
            .keep_alive_timeout(settings.keepalive)
            .max_concurrent_streams(settings.max_concurrent_streams);
        let mut conn = pin!(http2.serve_connection(TokioIo::new(io), service));
        let mut draining = false;
        loop {
            tokio::select! {
                served = &mut conn => {
                    if let Err(e) = served {
                        tracing::debug!(error = %e, "gRPC connection ended");
                    }
                    return;
                }
                _ = closing.changed() => {
                    if draining {
                        // The drain's time is up (or the listener gone).
                        return;
                    }
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// Where a connection is served: the accept lane until its first call,
/// then the home that call chose.
struct Home {
    homes: Homes,
    /// Chosen by the first call.
    target: OnceLock<Handle>,
    /// How often the connection's task moved to another runtime (an
    /// operator's to the control lane for its handshake, any to its target
    /// at its first call).
    moves: AtomicUsize,
}

impl Home {
    fn new(homes: Homes) -> Home {
        Home {
            homes,
            target: OnceLock::new(),
            moves: AtomicUsize::new(0),
        }
    }

    /// Sends the connection home: agents' sessions or operators.
    fn choose(&self, path: &str) {
        self.target.get_or_init(|| {
            let service = path.trim_start_matches('/').split('/').next();
            let role = if service == Some(AGENT_SERVICE) {
                Role::Agent
            } else {
                Role::Operator
            };
            self.homes.of(role).clone()
        });
    }
}

/// A connection's future: polled where it was spawned until its first
/// call chose a home, then handed to a task there (whose first poll
/// registers the new task's waker with everything it waits on), unless it
/// is there already.
struct Homed {
    served: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    home: Arc<Home>,
    /// Home, or known to stay where it is.
    settled: bool,
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
        if self.settled {
            return Poll::Pending;
        }
        let Some(target) = self.home.target.get().cloned() else {
            return Poll::Pending;
        };
        self.settled = true;
        if target.id() == Handle::current().id() {
            return Poll::Pending;
        }
        if let Some(served) = self.served.take() {
            self.home.moves.fetch_add(1, Ordering::Release);
            target.spawn(served);
        }
        Poll::Ready(())
    }
}

/// Runs a connection's calls (hyper's stream tasks) at the connection's
/// home (chosen by then: the first call chooses before hyper spawns it).
#[derive(Clone)]
struct Spawner(Arc<Home>);

impl<F> hyper::rt::Executor<F> for Spawner
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, call: F) {
        match self.0.target.get() {
            Some(home) => drop(home.spawn(call)),
            None => drop(tokio::spawn(call)),
        }
    }
}

/// The per-connection service: gives each request the connection's
/// address and TLS session (as tonic's own server does, for
/// `Request::peer_certs`) and chooses the connection's home at its first
/// call. A hyper service, not a tower one: hyper calls it when the request
/// arrives, before it spawns the call, so the call is spawned at the
/// chosen home (hyper-util's tower adapter would call it lazily, from
/// within the spawned task).
#[derive(Clone)]
struct Homing<I> {
    routes: TowerToHyperService<Routes>,
    info: I,
    home: Arc<Home>,
}

impl<I, B> hyper::service::Service<http::Request<B>> for Homing<I>
where
    I: Clone + Send + Sync + 'static,
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = Deadline<TowerToHyperServiceFuture<Routes, http::Request<B>>>;

    fn call(&self, mut req: http::Request<B>) -> Self::Future {
        self.home.choose(req.uri().path());
        req.extensions_mut().insert(self.info.clone());
        let timeout = grpc_timeout(req.headers());
        Deadline {
            call: Box::pin(self.routes.call(req)),
            expires: timeout.map(|t| Box::pin(tokio::time::sleep(t))),
        }
    }
}

/// A call's reply, or `DEADLINE_EXCEEDED` once the caller's deadline has
/// passed (the timer belongs to the runtime the call was read on).
pub(crate) struct Deadline<F> {
    call: Pin<Box<F>>,
    expires: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<F> Future for Deadline<F>
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, std::convert::Infallible>>,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        if let Poll::Ready(reply) = self.call.as_mut().poll(cx) {
            return Poll::Ready(reply);
        }
        match self.expires.as_mut().map(|e| e.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Ok(tonic::Status::deadline_exceeded(
                "the call's deadline (grpc-timeout) passed before the hub replied",
            )
            .into_http())),
            _ => Poll::Pending,
        }
    }
}

/// The deadline a client set (`grpc-timeout`: at most 8 digits and a unit,
/// H M S m u n); an absent or malformed one sets none.
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A connection's socket, registered again with the reactor of the
/// runtime it is polled on whenever its connection has moved there (a busy
/// runtime's reactor is polled only between its tasks).
struct Rehoming {
    tcp: Option<TcpStream>,
    info: TcpConnectInfo,
    home: Arc<Home>,
    /// The moves it has followed.
    moves: usize,
}

impl Rehoming {
    fn new(tcp: TcpStream, home: Arc<Home>) -> Rehoming {
        Rehoming {
            info: tcp.connect_info(),
            tcp: Some(tcp),
            home,
            moves: 0,
        }
    }

    /// The socket, on the reactor of the runtime polling it.
    fn tcp(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        let moves = self.home.moves.load(Ordering::Acquire);
        if moves != self.moves {
            self.moves = moves;
            if let Some(tcp) = self.tcp.take() {
                // Polled by the moved connection's task: its home's reactor.
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

/// hyper's timer (keepalive pings) on the runtime polling the
/// connection: each sleep follows the connection (after a move, the
/// runtime it was made on may be busy, or gone).
#[derive(Clone, Copy, Debug)]
struct HomeTimer;

impl hyper::rt::Timer for HomeTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HomeSleep::until(tokio::time::Instant::now() + duration))
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HomeSleep::until(tokio::time::Instant::from_std(deadline)))
    }

    fn now(&self) -> std::time::Instant {
        tokio::time::Instant::now().into_std()
    }
}

/// A sleep on the timer of the runtime that polls it: made again when
/// polled by another task (a connection moves to a new task at its new
/// home; the task id is a thread-local read, the runtime's handle an
/// atomic count on every poll).
struct HomeSleep {
    sleep: Pin<Box<tokio::time::Sleep>>,
    task: Option<tokio::task::Id>,
}

impl HomeSleep {
    fn until(deadline: tokio::time::Instant) -> HomeSleep {
        HomeSleep {
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
            task: tokio::task::try_id(),
        }
    }
}

impl Future for HomeSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if tokio::task::try_id() != self.task {
            *self = HomeSleep::until(self.sleep.deadline());
        }
        self.sleep.as_mut().poll(cx)
    }
}

impl hyper::rt::Sleep for HomeSleep {}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::service::Service as _;
    use std::sync::Mutex;
    use tokio::runtime::{Runtime, RuntimeFlavor};
    use unitsync_proto::dial;

    /// A certificate for `localhost` that notes the runtime each handshake
    /// was done on (rustls picks the certificate as the handshake starts).
    #[derive(Debug)]
    struct Noting {
        key: Arc<rustls::sign::CertifiedKey>,
        runtimes: Mutex<Vec<tokio::runtime::Id>>,
    }

    impl rustls::server::ResolvesServerCert for Noting {
        fn resolve(
            &self,
            _: rustls::server::ClientHello<'_>,
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            self.runtimes.lock().unwrap().push(Handle::current().id());
            Some(self.key.clone())
        }
    }

    /// A connection that sends an operator's ClientHello and no more.
    fn stalled_hello(to: std::net::SocketAddr) -> std::net::TcpStream {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = vec![dial::ALPN_H2.to_vec(), dial::Role::Operator.alpn().to_vec()];
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut tcp = std::net::TcpStream::connect(to).unwrap();
        while tls.wants_write() {
            tls.write_tls(&mut tcp).unwrap();
        }
        tcp
    }

    fn lane() -> Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn operators_tls_handshakes_are_done_on_the_control_lane_up_to_a_bound() {
        let (accept, sessions, control, client) = (lane(), lane(), lane(), lane());
        assert_eq!(client.handle().runtime_flavor(), RuntimeFlavor::MultiThread);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let noting = Arc::new(Noting {
            key: Arc::new(rustls::sign::CertifiedKey::new(
                vec![cert.cert.der().clone()],
                provider.key_provider.load_private_key(key).unwrap(),
            )),
            runtimes: Mutex::default(),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(noting.clone());
        config.alpn_protocols = vec![dial::ALPN_H2.to_vec()];
        let homes = Homes {
            sessions: sessions.handle().clone(),
            control: control.handle().clone(),
        };
        let listener = accept.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let bound = listener.local_addr().unwrap();
        let address = format!(
            "https://localhost:{}",
            listener.local_addr().unwrap().port()
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let settings = Settings {
            keepalive: Duration::from_secs(30),
            max_concurrent_streams: 16,
        };
        let served = accept.spawn(serve(
            listener,
            Routes::default(),
            Some(Arc::new(config)),
            settings,
            homes,
            async {
                let _ = stopped.await;
            },
        ));
        let ca = cert.cert.pem();
        let connect = |role: Option<dial::Role>| {
            let connect = async {
                match role {
                    Some(role) => {
                        let (endpoint, dialer) =
                            dial::prepare(&address, role, Some(&ca), None).unwrap();
                        endpoint.connect_with_connector(dialer).await
                    }
                    // As tonic dials without the role (an older agent).
                    None => {
                        tonic::transport::Endpoint::from_shared(address.clone())
                            .unwrap()
                            .tls_config(
                                tonic::transport::ClientTlsConfig::new()
                                    .ca_certificate(tonic::transport::Certificate::from_pem(&ca)),
                            )
                            .unwrap()
                            .connect()
                            .await
                    }
                }
            };
            client
                .block_on(async { tokio::time::timeout(Duration::from_secs(10), connect).await })
                .expect("connected in time")
                .expect("connected")
        };
        // One call (to a service of either home; none is served here, so
        // the reply is UNIMPLEMENTED, a whole round trip).
        let call = |channel: &tonic::transport::Channel, agent_call: bool| {
            let channel = channel.clone();
            let call = async move {
                let status = if agent_call {
                    let mut c =
                        unitsync_proto::v1::agent_service_client::AgentServiceClient::new(channel);
                    c.renew_certificate(unitsync_proto::v1::RenewCertificateRequest::default())
                        .await
                } else {
                    let mut c =
                        unitsync_proto::v1::hub_service_client::HubServiceClient::new(channel);
                    c.list_environments(unitsync_proto::v1::ListEnvironmentsRequest::default())
                        .await
                        .map(|_| tonic::Response::new(Default::default()))
                };
                assert_eq!(status.unwrap_err().code(), tonic::Code::Unimplemented);
            };
            client
                .block_on(async { tokio::time::timeout(Duration::from_secs(10), call).await })
                .expect("answered in time");
        };
        // One connection and one call; the runtime its handshake was done on.
        let handshaken_on = |role: Option<dial::Role>, agent_call: bool| {
            let channel = connect(role);
            call(&channel, agent_call);
            let on = noting.runtimes.lock().unwrap().pop().expect("handshaken");
            (on, channel)
        };
        let operator = Some(dial::Role::Operator);
        let agent = Some(dial::Role::Agent);
        assert_eq!(handshaken_on(operator, false).0, control.handle().id());
        assert_eq!(handshaken_on(agent, true).0, accept.handle().id());
        assert_eq!(handshaken_on(None, false).0, accept.handle().id());

        // ClientHellos that claim the operator's role and never finish
        // their handshakes fill the control lane's handshakes; the next
        // operator's is done on the accept lane.
        let stalled: Vec<std::net::TcpStream> = (0..CONTROL_HANDSHAKES)
            .map(|_| stalled_hello(bound))
            .collect();
        let waiting = std::time::Instant::now();
        while noting.runtimes.lock().unwrap().len() < CONTROL_HANDSHAKES {
            assert!(
                waiting.elapsed() < Duration::from_secs(10),
                "not handshaking"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let on: Vec<_> = noting.runtimes.lock().unwrap().drain(..).collect();
        assert!(on.iter().all(|id| *id == control.handle().id()));
        assert_eq!(handshaken_on(operator, false).0, accept.handle().id());
        // Their handshakes fail as they hang up, and free the lane.
        drop(stalled);
        let waiting = std::time::Instant::now();
        while handshaken_on(operator, false).0 != control.handle().id() {
            assert!(waiting.elapsed() < Duration::from_secs(10), "never freed");
        }

        // A role that its first call contradicts: the connection (and its
        // socket) moves on to the call's home and keeps working with the
        // control lane gone.
        let (on, channel) = handshaken_on(operator, true);
        assert_eq!(on, control.handle().id());
        control.shutdown_background();
        call(&channel, true);
        drop(stop);
        accept
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), served).await })
            .expect("stopped in time")
            .unwrap();
    }

    #[test]
    fn grpc_timeouts_are_read_as_the_protocol_writes_them() {
        let timeout = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&h)
        };
        assert_eq!(timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(timeout("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "m", "5", "123456789S", "1.5S", "-1S", "5s", "5 S"] {
            assert_eq!(timeout(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
    }

    #[test]
    fn the_first_call_chooses_the_connections_home_before_it_is_spawned() {
        let sessions = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let control = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _rt = sessions.enter();
        let request = |path: &str| {
            http::Request::builder()
                .uri(path)
                .body(tonic::body::Body::empty())
                .unwrap()
        };
        let home_of = |path: &str| {
            let home = Arc::new(Home::new(Homes {
                sessions: sessions.handle().clone(),
                control: control.handle().clone(),
            }));
            let homing = Homing {
                routes: TowerToHyperService::new(Routes::default()),
                info: (),
                home: home.clone(),
            };
            // As hyper calls it: chosen before the call's future is
            // polled (hyper then spawns that future at the home).
            let call = homing.call(request(path));
            let chosen = home.target.get().map(Handle::id);
            drop(call);
            // Later calls do not move it again.
            drop(homing.call(request("/other.Service/Call")));
            assert_eq!(home.target.get().map(Handle::id), chosen);
            chosen.expect("chosen when called")
        };
        assert_eq!(
            home_of("/unitsync.v1.AgentService/Session"),
            sessions.handle().id()
        );
        assert_eq!(
            home_of("/unitsync.v1.HubService/PutUnit"),
            control.handle().id()
        );
    }
}
