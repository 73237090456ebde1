//! `authorize.rule`: a CEL expression over the connection's claims and the channel, compiled
//! once per config (`wsrelay_config::rule`, which also bounds its size and shape) and
//! evaluated per subscribe and publish.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::Denied;
use crate::metrics::{Metrics, OpReason};

/// A compiled rule.
pub struct Rule {
    /// `None` when the rule does not compile: it then denies everything. A validated
    /// config never gets here (the operator and the relay's loader compile it first).
    program: Option<cel::Program>,
    /// The standard functions and macros, built once.
    env: Arc<cel::Env>,
}

impl std::fmt::Debug for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rule")
            .field("compiled", &self.program.is_some())
            .finish()
    }
}

impl Rule {
    /// Compiles `source`.
    pub fn new(source: &str) -> Self {
        Self {
            program: wsrelay_config::rule::compile(source).ok(),
            env: Arc::new(cel::Env::stdlib()),
        }
    }

    /// Whether the rule is `true` for these values; anything else (false, another type, an
    /// error such as an absent claim) denies, and an error is counted as a failure.
    pub fn allows(
        &self,
        claims: Option<&Map<String, Value>>,
        vars: &[(String, String)],
        channel: &str,
        op: &'static str,
        metrics: &Metrics,
    ) -> Result<(), Denied> {
        match self.evaluate(claims, vars, channel, op) {
            Ok(true) => Ok(()),
            Ok(false) => Err(Denied::Rule),
            Err(reason) => {
                tracing::debug!(%channel, op, error = %reason, "rule failed");
                metrics
                    .authorize_failures
                    .get_or_create(&OpReason {
                        op,
                        reason: "rule_error",
                    })
                    .inc();
                Err(Denied::Rule)
            }
        }
    }

    fn evaluate(
        &self,
        claims: Option<&Map<String, Value>>,
        vars: &[(String, String)],
        channel: &str,
        op: &str,
    ) -> Result<bool, String> {
        let program = self.program.as_ref().ok_or("the rule does not compile")?;
        let mut ctx = cel::Context::with_env(self.env.clone());
        let empty = Map::new();
        let claims = cel::to_value(claims.unwrap_or(&empty)).map_err(|e| e.to_string())?;
        let vars: std::collections::HashMap<&str, &str> =
            vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let vars = cel::to_value(vars).map_err(|e| e.to_string())?;
        ctx.add_variable_from_value("claims", claims);
        ctx.add_variable_from_value("vars", vars);
        ctx.add_variable_from_value("channel", channel);
        ctx.add_variable_from_value("op", op);
        match program.execute(&ctx) {
            Ok(cel::Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!("the rule gave {other:?}, not a bool")),
            Err(e) => Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn allows(rule: &str, claims: Value, vars: &[(&str, &str)], op: &'static str) -> bool {
        let claims = claims.as_object().cloned();
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Rule::new(rule)
            .allows(claims.as_ref(), &vars, "rooms.1", op, &Metrics::new())
            .is_ok()
    }

    #[test]
    fn a_rule_decides_from_claims_vars_channel_and_op() {
        let rule = "vars.room in claims.rooms || 'admin' in claims.roles";
        let alice = json!({"sub": "alice", "rooms": ["1", "2"], "roles": []});
        assert!(allows(rule, alice.clone(), &[("room", "1")], "subscribe"));
        assert!(!allows(rule, alice, &[("room", "3")], "subscribe"));
        let admin = json!({"sub": "root", "rooms": [], "roles": ["admin"]});
        assert!(allows(rule, admin, &[("room", "3")], "subscribe"));
        assert!(allows(
            "op == 'subscribe' && channel == 'rooms.1'",
            json!({}),
            &[],
            "subscribe"
        ));
        assert!(!allows("op == 'subscribe'", json!({}), &[], "publish"));
    }

    #[test]
    fn an_error_or_a_non_bool_denies_and_is_counted() {
        let metrics = Metrics::new();
        let rule = Rule::new("vars.room in claims.rooms");
        let anonymous = rule.allows(
            None,
            &[("room".into(), "1".into())],
            "rooms.1",
            "subscribe",
            &metrics,
        );
        assert!(matches!(anonymous, Err(Denied::Rule)));
        assert!(!allows("claims.sub", json!({"sub": "a"}), &[], "subscribe"));
        assert!(metrics.encode().contains(
            "wsrelay_authorize_failures_total{op=\"subscribe\",reason=\"rule_error\"} 1"
        ));
        assert!(allows(
            "has(claims.rooms) && vars.room in claims.rooms || !has(claims.rooms)",
            json!({}),
            &[("room", "1")],
            "subscribe"
        ));
    }

    #[test]
    fn a_rule_that_does_not_compile_denies() {
        assert!(!allows("vars.room in", json!({}), &[], "subscribe"));
    }
}
