//! Why a state change was refused: the adapters translate these into their
//! own answers (HTTP status, CLI message, dead letter).

/// A state change that did not happen.
#[derive(Debug)]
pub enum FlowError {
    /// The named thing does not exist (or is not the caller's).
    NotFound(&'static str),
    /// The change conflicts with the current state: a stable code and a
    /// message for the caller.
    Conflict(&'static str, String),
    /// The database failed.
    Db(sqlx::Error),
}

impl From<sqlx::Error> for FlowError {
    fn from(e: sqlx::Error) -> Self {
        FlowError::Db(e)
    }
}

impl std::fmt::Display for FlowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FlowError::NotFound(what) => write!(f, "{what} not found"),
            FlowError::Conflict(code, message) => write!(f, "{code}: {message}"),
            FlowError::Db(e) => write!(f, "database: {e}"),
        }
    }
}

impl std::error::Error for FlowError {}
