//! Compiles `unitsync/v1/*.proto` with protox (pure Rust; no system `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["unitsync/v1/agent.proto", "unitsync/v1/hub.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    // The descriptors, for the evolution check (a checked-in snapshot).
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .type_attribute(".", "#[allow(clippy::all, clippy::pedantic)]")
        .compile_fds(fds)?;
    // The hub's side of `AgentService` once more, with `HubMessage` as
    // `crate::outgoing::Outgoing` (wire-identical, updates pre-encoded) and
    // every other message from `v1`.
    let session = out.join("session");
    std::fs::create_dir_all(&session)?;
    tonic_prost_build::configure()
        .build_client(false)
        .out_dir(&session)
        .extern_path(".unitsync.v1.HubMessage", "crate::outgoing::Outgoing")
        .extern_path(".unitsync.v1", "crate::v1")
        .compile_fds(protox::compile(["unitsync/v1/agent.proto"], ["."])?)?;
    Ok(())
}
