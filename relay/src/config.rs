//! The relay configuration file format (rendered by the operator, read by the relay).

use serde::{Deserialize, Serialize};

/// Top-level relay configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// NATS server URLs the relay connects to.
    pub nats_urls: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_refused() {
        let err = serde_json::from_str::<Config>(r#"{"natsUrls":[],"natsUrl":"x"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `natsUrl`"), "{err}");
    }
}
