//! The gRPC edge: the listener that accepts connections and homes them
//! ([`listener`]), the agent stream ([`agent`]), the operator API
//! ([`admin`]) behind its authentication layer ([`operator`]), and the
//! conversions between prost and domain types ([`convert`]). Errors become statuses only through
//! `From<HubError> for Status`.

pub mod admin;
pub mod agent;
pub mod convert;
pub mod listener;
pub mod operator;
mod watch;

/// The two gRPC services of a hub, with the protocol's message limits;
/// only operators reach `HubService`. `AgentService` is served from
/// `unitsync_proto::session` (updates encoded once for every session).
pub fn services(
    hub: &std::sync::Arc<crate::control::Hub>,
    stop: tokio_util::sync::CancellationToken,
) -> (
    unitsync_proto::session::agent_service_server::AgentServiceServer<agent::AgentService>,
    operator::OperatorAuth<
        unitsync_proto::v1::hub_service_server::HubServiceServer<admin::AdminService>,
    >,
) {
    use tower::Layer;
    use unitsync_proto::MAX_MESSAGE_BYTES;
    let agent = unitsync_proto::session::agent_service_server::AgentServiceServer::new(
        agent::AgentService::new(hub.clone()),
    )
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let admin = unitsync_proto::v1::hub_service_server::HubServiceServer::new(
        admin::AdminService::new(hub.clone(), stop),
    )
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    (
        agent,
        operator::OperatorLayer::new(hub.clone()).layer(admin),
    )
}
