//! One error type for the reconcile pipeline: a variant per stage, and a bounded category
//! per error that names it in metrics (label `category`) and Events (reason).

use crate::build::BuildError;
use crate::validate::ValidateError;

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading an object from the API server failed (transient).
    #[error("fetching {name}: {source}")]
    Fetch {
        name: String,
        #[source]
        source: kube::Error,
    },
    /// The watch caches have not listed their objects yet (just started, or the API server
    /// does not answer): reconciling from an empty cache would act on absent children.
    #[error("the watch caches are not filled yet (waited {0:?})")]
    CachesNotReady(std::time::Duration),
    /// The spec refers to something unusable (a user error: fix the spec or the Secret).
    #[error(transparent)]
    Validate(#[from] ValidateError),
    /// The desired objects could not be built.
    #[error("building the desired objects: {0}")]
    Build(#[from] BuildError),
    /// Server-side apply of a child object failed.
    #[error("applying {kind} {name}: {source}")]
    Apply {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    /// Listing or deleting an orphaned child failed.
    #[error("removing {kind} objects no longer desired: {source}")]
    Cleanup {
        kind: &'static str,
        #[source]
        source: kube::Error,
    },
    /// Writing the status failed.
    #[error("updating the status: {0}")]
    Status(#[source] kube::Error),
}

impl Error {
    /// A short CamelCase name from a fixed set: the metric label and the Event reason.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Fetch { .. } | Self::CachesNotReady(_) => "FetchFailed",
            Self::Validate(e) => e.category(),
            Self::Build(BuildError::InvalidConfig(_)) => "InvalidConfig",
            Self::Build(_) => "BuildFailed",
            Self::Apply { source, .. } => match api_code(source) {
                Some(400 | 422) => "ApplyInvalid",
                Some(403) => "ApplyForbidden",
                _ => "ApplyFailed",
            },
            Self::Cleanup { .. } => "CleanupFailed",
            Self::Status(_) => "StatusFailed",
        }
    }

    /// Whether a person must act (the spec or a Secret is wrong): the gateway is marked
    /// Degraded and an Event says why. Other errors are retried quietly.
    /// An apply the API server refused is one too: 400/422 (an object the spec maps to is
    /// invalid) or 403 (an admission webhook or policy, a ResourceQuota, or the operator's
    /// own RBAC). Retrying cannot fix those; someone has to.
    pub fn is_user_error(&self) -> bool {
        matches!(self, Self::Validate(_))
            || matches!(self, Self::Build(BuildError::InvalidConfig(_)))
            || matches!(self, Self::Apply { source, .. } if matches!(api_code(source), Some(400 | 403 | 422)))
    }
}

/// The HTTP status of an error the API server answered with (None: no answer).
fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// Every category [`Error::category`] can return, so metrics can be pre-registered and a
/// test can check the set stays bounded.
pub const CATEGORIES: &[&str] = &[
    "FetchFailed",
    "SecretNotFound",
    "SecretKeyNotFound",
    "InvalidSecret",
    "SecretNotUsable",
    "InvalidRule",
    "InvalidPresence",
    "InvalidEvents",
    "InvalidConfig",
    "BuildFailed",
    "ApplyFailed",
    "ApplyInvalid",
    "ApplyForbidden",
    "CleanupFailed",
    "StatusFailed",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error() -> kube::Error {
        api_error_with(500)
    }

    fn api_error_with(code: u16) -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure("boom", "InternalError")
                .with_code(code)
                .boxed(),
        )
    }

    fn apply_error(code: u16) -> Error {
        Error::Apply {
            kind: "Service",
            name: "chat".into(),
            source: api_error_with(code),
        }
    }

    /// An invalid child, an admission refusal or an exhausted quota is reported on the
    /// gateway (Degraded and a Warning Event), with its own reason; a 5xx or a lost
    /// connection is retried quietly.
    #[test]
    fn refused_applies_are_user_errors_with_their_own_reason() {
        assert_eq!(apply_error(422).category(), "ApplyInvalid");
        assert_eq!(apply_error(400).category(), "ApplyInvalid");
        assert_eq!(apply_error(403).category(), "ApplyForbidden");
        assert_eq!(apply_error(500).category(), "ApplyFailed");
        for code in [400, 403, 422] {
            assert!(apply_error(code).is_user_error(), "{code}");
        }
        for code in [409, 429, 500, 503] {
            assert!(!apply_error(code).is_user_error(), "{code}");
        }
    }

    #[test]
    fn every_error_has_a_category_from_the_fixed_set() {
        let errors = [
            Error::Fetch {
                name: "s".into(),
                source: api_error(),
            },
            Error::Validate(ValidateError::SecretNotFound { name: "s".into() }),
            Error::Validate(ValidateError::SecretKeyNotFound {
                name: "s".into(),
                key: "k".into(),
            }),
            Error::Validate(ValidateError::InvalidSecret {
                name: "s".into(),
                key: "k".into(),
                reason: "r".into(),
            }),
            Error::Validate(ValidateError::SecretNotUsable {
                name: "s".into(),
                label: crate::validate::SecretLabel {
                    key: "k".into(),
                    value: "v".into(),
                },
            }),
            Error::Validate(ValidateError::InvalidRule {
                field: "spec.bindings[0].authorize.rule".into(),
                error: wsrelay_config::rule::compile("nope(").expect_err("bad rule"),
            }),
            Error::Validate(ValidateError::InvalidPresence {
                faults: vec!["spec.registry.replicas: must be 1, 3 or 5".into()],
            }),
            Error::Validate(ValidateError::InvalidEvents {
                faults: vec!["spec.events.durable.replicas: must be 1, 3 or 5".into()],
            }),
            Error::Build(BuildError::MissingMetadata("uid")),
            Error::Apply {
                kind: "Deployment",
                name: "d".into(),
                source: api_error(),
            },
            apply_error(422),
            apply_error(403),
            Error::Cleanup {
                kind: "HorizontalPodAutoscaler",
                source: api_error(),
            },
            Error::Status(api_error()),
            Error::CachesNotReady(std::time::Duration::from_secs(10)),
        ];
        for e in &errors {
            assert!(CATEGORIES.contains(&e.category()), "{}", e.category());
        }
    }

    #[test]
    fn only_spec_and_secret_problems_are_user_errors() {
        assert!(
            Error::Validate(ValidateError::SecretNotFound { name: "s".into() }).is_user_error()
        );
        assert!(!Error::Status(api_error()).is_user_error());
        assert!(
            !Error::Fetch {
                name: "s".into(),
                source: api_error()
            }
            .is_user_error()
        );
    }
}
