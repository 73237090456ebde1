//! Reading a config file (YAML or JSON).

use std::path::PathBuf;

use super::{Config, ValidationErrors};

/// Why a config file could not be loaded.
#[cfg(feature = "load")]
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid YAML/JSON for [`Config`] (unknown field, wrong type...).
    #[error("cannot parse {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with the position.
        message: String,
    },
    /// It parsed, but [`Config::validate`] found problems.
    #[error("{path}: {errors}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem found.
        errors: ValidationErrors,
    },
}

#[cfg(feature = "load")]
impl Config {
    /// Parses a config from YAML (or JSON, which is YAML) text, without validating it.
    pub fn from_yaml_str(text: &str) -> Result<Self, String> {
        serde_saphyr::from_str(text).map_err(|e| e.to_string())
    }

    /// Reads `path`, applies the environment overrides and validates the result.
    pub fn load(path: &std::path::Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::from_yaml_str(&text).map_err(|message| LoadError::Parse {
            path: path.to_owned(),
            message,
        })?;
        config.apply_env_overrides(|k| std::env::var(k).ok());
        config.validate().map_err(|errors| LoadError::Invalid {
            path: path.to_owned(),
            errors,
        })?;
        Ok(config)
    }
}
