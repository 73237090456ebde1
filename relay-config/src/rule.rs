//! `authorize.rule`: a CEL expression, checked once where the config is validated (the
//! operator's admission and the relay's load) so a relay never holds a rule it cannot run.
//!
//! Without the `cel` feature only the size is checked; with it, the rule is parsed and its
//! variables and shape checked ([`compile`]), and the parsed program is returned to run.

/// Variables a rule may name (docs/protocol.md section 3).
pub const VARIABLES: &[&str] = &["claims", "vars", "channel", "op"];
/// Most expression nodes a rule may have.
pub const MAX_NODES: usize = 256;

/// Why a rule is refused, with where, when the parser or checker knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", at.map(|(l, c)| format!("line {l}, column {c}: ")).unwrap_or_default())]
pub struct RuleError {
    /// Line and column (1-based) of the fault.
    pub at: Option<(usize, usize)>,
    /// What is wrong, for a person.
    pub message: String,
}

impl RuleError {
    fn new(at: Option<(usize, usize)>, message: impl Into<String>) -> Self {
        Self {
            at,
            message: message.into(),
        }
    }
}

/// Checks a rule: its size, and with the `cel` feature everything [`compile`] checks.
pub fn check(source: &str) -> Result<(), RuleError> {
    #[cfg(feature = "cel")]
    return compile(source).map(drop);
    #[cfg(not(feature = "cel"))]
    return check_size(source);
}

fn check_size(source: &str) -> Result<(), RuleError> {
    if source.trim().is_empty() {
        return Err(RuleError::new(None, "the rule is empty"));
    }
    if source.len() > crate::MAX_RULE_BYTES {
        return Err(RuleError::new(
            None,
            format!(
                "the rule is {} bytes, above the limit of {}",
                source.len(),
                crate::MAX_RULE_BYTES
            ),
        ));
    }
    Ok(())
}

/// Parses a rule and checks it: at most [`crate::MAX_RULE_BYTES`] and [`MAX_NODES`], only
/// the [`VARIABLES`] (and the macros' own), no comprehension inside another (so its cost is
/// bounded by its size times the longest list in the claims).
#[cfg(feature = "cel")]
pub fn compile(source: &str) -> Result<cel::Program, RuleError> {
    check_size(source)?;
    let program = cel::Program::compile(source).map_err(|errs| {
        let first = errs.errors.into_iter().next();
        let at = first.as_ref().and_then(|e| {
            let (l, c) = e.pos;
            (l >= 1 && c >= 0).then_some((l as usize, c as usize + 1))
        });
        RuleError::new(at, first.map_or_else(|| "does not parse".into(), |e| e.msg))
    })?;
    let mut walk = Walk {
        source,
        program: &program,
        nodes: 0,
        bound: Vec::new(),
        depth: 0,
    };
    walk.expr(program.expression())?;
    Ok(program)
}

#[cfg(feature = "cel")]
struct Walk<'a> {
    source: &'a str,
    program: &'a cel::Program,
    nodes: usize,
    /// Names the enclosing comprehensions bind.
    bound: Vec<&'a str>,
    /// Comprehensions around the node.
    depth: usize,
}

#[cfg(feature = "cel")]
impl<'a> Walk<'a> {
    /// Line and column (1-based) where node `id` starts.
    fn at(&self, id: u64) -> Option<(usize, usize)> {
        let (start, _) = self.program.source_info().offset_for(id)?;
        let before = self.source.get(..start as usize)?;
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
        Some((line, column))
    }

    fn expr(&mut self, e: &'a cel::IdedExpr) -> Result<(), RuleError> {
        use cel::common::ast::{EntryExpr, Expr};
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(RuleError::new(
                self.at(e.id),
                format!("the rule has more than {MAX_NODES} expression nodes"),
            ));
        }
        match &e.expr {
            Expr::Ident(name) => {
                if !VARIABLES.contains(&name.as_str()) && !self.bound.contains(&name.as_str()) {
                    return Err(RuleError::new(
                        self.at(e.id),
                        format!(
                            "undeclared reference to {name:?} (a rule may use {})",
                            VARIABLES.join(", ")
                        ),
                    ));
                }
            }
            Expr::Call(call) => {
                if let Some(t) = &call.target {
                    self.expr(t)?;
                }
                for a in &call.args {
                    self.expr(a)?;
                }
            }
            Expr::Select(s) => self.expr(&s.operand)?,
            Expr::List(l) => {
                for x in &l.elements {
                    self.expr(x)?;
                }
            }
            Expr::Map(m) => {
                for entry in &m.entries {
                    if let EntryExpr::MapEntry(me) = &entry.expr {
                        self.expr(&me.key)?;
                        self.expr(&me.value)?;
                    }
                }
            }
            Expr::Struct(_) => {
                return Err(RuleError::new(
                    self.at(e.id),
                    "a rule cannot build messages (no types are declared)",
                ));
            }
            Expr::Comprehension(c) => {
                if self.depth > 0 {
                    return Err(RuleError::new(
                        self.at(e.id),
                        "a comprehension (all, exists, exists_one, map, filter) inside another is not allowed: its cost would grow with the square of the claims",
                    ));
                }
                self.expr(&c.iter_range)?;
                self.expr(&c.accu_init)?;
                self.depth += 1;
                let before = self.bound.len();
                self.bound.push(&c.iter_var);
                if let Some(v) = &c.iter_var2 {
                    self.bound.push(v);
                }
                self.bound.push(&c.accu_var);
                self.expr(&c.loop_cond)?;
                self.expr(&c.loop_step)?;
                self.expr(&c.result)?;
                self.bound.truncate(before);
                self.depth -= 1;
            }
            Expr::Literal(_) | Expr::Unspecified => {}
        }
        Ok(())
    }
}

#[cfg(all(test, feature = "cel"))]
mod tests {
    use super::*;

    #[test]
    fn a_good_rule_compiles() {
        for ok in [
            "vars.room in claims.rooms || 'admin' in claims.roles",
            "has(claims.rooms) && claims.rooms.exists(r, r == vars.room)",
            "op == 'subscribe' && channel.startsWith('rooms.')",
            "claims.rooms.map(r, string(r)).size() > 0",
        ] {
            compile(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn a_syntax_error_names_its_position() {
        let e = compile("vars.room in claims.rooms ||").unwrap_err();
        assert!(matches!(e.at, Some((1, c)) if c >= 27), "{e}");
        assert!(e.to_string().starts_with("line 1, column "), "{e}");
        let e = compile("claims.a &&\n  (").unwrap_err();
        assert_eq!(e.at.map(|(l, _)| l), Some(2), "{e}");
    }

    #[test]
    fn an_unknown_variable_is_refused_where_it_stands() {
        let e = compile("vars.room == rooom").unwrap_err();
        assert_eq!(e.at, Some((1, 14)), "{e}");
        assert!(e.message.contains("\"rooom\""), "{e}");
    }

    #[test]
    fn nested_comprehensions_are_refused() {
        let e = compile("claims.a.all(x, claims.b.exists(y, y == x))").unwrap_err();
        assert!(e.message.contains("inside another"), "{e}");
    }

    #[test]
    fn size_is_bounded() {
        let long = vec!["op == 'subscribe'"; 80].join(" || ");
        assert!(compile(&long).is_err());
        let many = vec!["1"; 300].join("+");
        let e = compile(&format!("{many} > 0")).unwrap_err();
        assert!(e.message.contains("expression nodes"), "{e}");
        assert!(compile("  ").is_err());
    }
}
