//! The recipe layer's error: a syntax error, or a value refused naming its field.

use crate::error::ErrorCode;

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("{0}")]
    Syntax(String),
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

impl From<crate::methods::Invalid> for RecipeError {
    fn from(e: crate::methods::Invalid) -> Self {
        RecipeError::invalid(e.field, e.message)
    }
}

impl RecipeError {
    pub fn code(&self) -> ErrorCode {
        ErrorCode::InvalidRecipe
    }

    /// The field at fault, when one is.
    pub fn field(&self) -> Option<&str> {
        match self {
            RecipeError::Invalid { field, .. } => Some(field),
            RecipeError::Syntax(_) => None,
        }
    }

    pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        RecipeError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}
