# The agent (binary `unitsync-agent`) on a distroless, non-root base.
#   docker build -f deploy/docker/agent.Dockerfile -t unitsync-agent:dev .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p unitsync-agent --bin unitsync-agent

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/unitsync-agent /usr/local/bin/unitsync-agent
USER 65532:65532
# glibc hands memory back after a large unit: two arenas, trimmed past 128 KiB.
ENV MALLOC_ARENA_MAX=2 MALLOC_TRIM_THRESHOLD_=131072
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/unitsync-agent"]
