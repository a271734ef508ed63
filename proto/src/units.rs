//! How a unit's manifests (a multi-document YAML stream, as an `UnitUpdate`
//! carries them) are parsed on the agent, shared with the hub so that it
//! accepts only units every agent can parse: the parser's default budget
//! over the whole stream (documents, nodes, aliases, depth), and errors
//! without the source excerpt the parser would append (manifests hold
//! secret values, and errors end up in status that operators read).

/// The options agents parse a unit's stream with.
pub fn yaml_options() -> serde_saphyr::Options {
    let mut options = serde_saphyr::Options::default();
    options.with_snippet = false;
    options
}

#[cfg(test)]
mod tests {
    #[test]
    fn errors_carry_no_excerpt_of_the_source() {
        let text = "a: s3cr3t-value\n  b: [\n";
        let e = serde_saphyr::from_multiple_with_options::<serde_json::Value>(
            text,
            super::yaml_options(),
        )
        .unwrap_err()
        .to_string();
        assert!(!e.contains("s3cr3t-value"), "{e}");
    }
}
