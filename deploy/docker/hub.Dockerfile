# The hub (binary `unitsync`): static-enough glibc build on a distroless,
# non-root base. Build from the repository root:
#   docker build -f deploy/docker/hub.Dockerfile -t unitsync:dev .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p unitsync-hub --bin unitsync

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/unitsync /usr/local/bin/unitsync
USER 65532:65532
EXPOSE 7443 7080
ENTRYPOINT ["/usr/local/bin/unitsync"]
CMD ["serve"]
