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
            Self::Fetch { .. } => "FetchFailed",
            Self::Validate(e) => e.category(),
            Self::Build(BuildError::InvalidConfig(_)) => "InvalidConfig",
            Self::Build(_) => "BuildFailed",
            Self::Apply { .. } => "ApplyFailed",
            Self::Cleanup { .. } => "CleanupFailed",
            Self::Status(_) => "StatusFailed",
        }
    }

    /// Whether a person must act (the spec or a Secret is wrong): the gateway is marked
    /// Degraded and an Event says why. Other errors are retried quietly.
    pub fn is_user_error(&self) -> bool {
        matches!(self, Self::Validate(_))
            || matches!(self, Self::Build(BuildError::InvalidConfig(_)))
    }
}

/// Every category [`Error::category`] can return, so metrics can be pre-registered and a
/// test can check the set stays bounded.
pub const CATEGORIES: &[&str] = &[
    "FetchFailed",
    "SecretNotFound",
    "SecretKeyNotFound",
    "InvalidSecret",
    "InvalidConfig",
    "BuildFailed",
    "ApplyFailed",
    "CleanupFailed",
    "StatusFailed",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error() -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure("boom", "InternalError")
                .with_code(500)
                .boxed(),
        )
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
            Error::Build(BuildError::MissingMetadata("uid")),
            Error::Apply {
                kind: "Deployment",
                name: "d".into(),
                source: api_error(),
            },
            Error::Cleanup {
                kind: "HorizontalPodAutoscaler",
                source: api_error(),
            },
            Error::Status(api_error()),
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
