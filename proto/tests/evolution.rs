//! The protocol evolves additively only: every message field, enum value
//! and RPC recorded in `descriptor.snapshot` must still exist with the same
//! number, name, type and label (a `buf breaking`-style check). New ones are
//! fine once recorded: run with `UPDATE_DESCRIPTOR_SNAPSHOT=1` to rewrite
//! the snapshot, and review the diff.

use std::collections::BTreeSet;

use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FileDescriptorSet};

const SNAPSHOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/descriptor.snapshot");

fn type_name(f: &prost_types::FieldDescriptorProto) -> String {
    match f.r#type() {
        Type::Message | Type::Enum => f.type_name().to_owned(),
        t => format!("{t:?}").to_lowercase(),
    }
}

fn message(prefix: &str, m: &DescriptorProto, out: &mut BTreeSet<String>) {
    let name = format!("{prefix}.{}", m.name());
    out.insert(format!("message {name}"));
    for f in &m.field {
        let label = match f.label() {
            Label::Repeated => "repeated",
            Label::Optional if f.proto3_optional() => "optional",
            Label::Optional => "singular",
            Label::Required => "required",
        };
        out.insert(format!(
            "field {name} {} {} {} {label}",
            f.number(),
            f.name(),
            type_name(f)
        ));
    }
    for e in &m.enum_type {
        enumeration(&name, e, out);
    }
    for nested in &m.nested_type {
        message(&name, nested, out);
    }
}

fn enumeration(prefix: &str, e: &prost_types::EnumDescriptorProto, out: &mut BTreeSet<String>) {
    let name = format!("{prefix}.{}", e.name());
    out.insert(format!("enum {name}"));
    for v in &e.value {
        out.insert(format!("value {name} {} {}", v.number(), v.name()));
    }
}

/// One line per message, field, enum value and RPC, sorted.
fn describe() -> BTreeSet<String> {
    let fds = FileDescriptorSet::decode(unitsync_proto::FILE_DESCRIPTOR_SET).expect("descriptors");
    let mut out = BTreeSet::new();
    for file in fds.file.iter().filter(|f| f.package() == "unitsync.v1") {
        let pkg = format!(".{}", file.package());
        for m in &file.message_type {
            message(&pkg, m, &mut out);
        }
        for e in &file.enum_type {
            enumeration(&pkg, e, &mut out);
        }
        for s in &file.service {
            for m in &s.method {
                out.insert(format!(
                    "rpc {pkg}.{}.{} {}{} -> {}{}",
                    s.name(),
                    m.name(),
                    if m.client_streaming() { "stream " } else { "" },
                    m.input_type(),
                    if m.server_streaming() { "stream " } else { "" },
                    m.output_type()
                ));
            }
        }
    }
    out
}

/// Whether `now` keeps everything `recorded` has, and records all it has.
fn verdict(recorded: &BTreeSet<String>, now: &BTreeSet<String>) -> Result<(), String> {
    let broken: Vec<&str> = recorded.difference(now).map(String::as_str).collect();
    if !broken.is_empty() {
        return Err(format!(
            "incompatible protocol change: these are gone or changed (fields keep their number, name, type and label; reserve removed numbers):\n  {}",
            broken.join("\n  ")
        ));
    }
    let added: Vec<&str> = now.difference(recorded).map(String::as_str).collect();
    if !added.is_empty() {
        return Err(format!(
            "new protocol elements are not in the snapshot yet; record them with UPDATE_DESCRIPTOR_SNAPSHOT=1 cargo test -p unitsync-proto --test evolution:\n  {}",
            added.join("\n  ")
        ));
    }
    Ok(())
}

#[test]
fn the_protocol_only_grows() {
    let now = describe();
    if std::env::var_os("UPDATE_DESCRIPTOR_SNAPSHOT").is_some() {
        let text: String = now.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(SNAPSHOT, text).expect("write the snapshot");
        return;
    }
    let recorded: BTreeSet<String> = std::fs::read_to_string(SNAPSHOT)
        .expect("proto/descriptor.snapshot (create it with UPDATE_DESCRIPTOR_SNAPSHOT=1)")
        .lines()
        .map(str::to_owned)
        .collect();
    if let Err(e) = verdict(&recorded, &now) {
        panic!("{e}");
    }
}

#[test]
fn renumbered_retyped_and_unrecorded_elements_are_caught() {
    let now = describe();
    let field = now
        .iter()
        .find(|l| l.starts_with("field .unitsync.v1.UnitUpdate "))
        .expect("UnitUpdate has fields")
        .clone();
    let parts: Vec<String> = field.split(' ').map(str::to_owned).collect();
    // What the snapshot would say if the field had another number, or type.
    for (i, other) in [(2, "99"), (4, "bytes")] {
        let mut changed = parts.clone();
        changed[i] = other.to_owned();
        let mut recorded = now.clone();
        recorded.remove(&field);
        recorded.insert(changed.join(" "));
        let e = verdict(&recorded, &now).unwrap_err();
        assert!(e.starts_with("incompatible"), "{e}");
    }
    // A new field not yet recorded.
    let mut recorded = now.clone();
    recorded.remove(&field);
    let e = verdict(&recorded, &now).unwrap_err();
    assert!(e.contains("not in the snapshot"), "{e}");
    assert!(verdict(&now, &now).is_ok());
}
