//! The library's error: what went wrong, and whose fault it is.
//!
//! [`Error::kind`] tells a caller what to do with a failure: a CLI maps it to an exit status, a
//! server to an HTTP status (bad input → 400, a missing or corrupt model → 500 at start-up, a
//! device failure → 503, the rest → 500). Messages are one line naming the file, field or value
//! at fault; [`Context`] adds where it happened without losing the kind.
//!
//! Model code (layers, ops) keeps candle's `Result`, like every candle-transformers model; its
//! errors arrive here as [`ErrorKind::Internal`] unless a caller says otherwise.

use std::fmt;

/// Whose fault a failure is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The model's files: missing, unreadable, corrupt, or describing a model we cannot run.
    Model,
    /// What the caller asked for: a prompt, token ids, generation parameters, a chat template
    /// input. Retrying the same request fails the same way.
    Input,
    /// The device: no CUDA in this build, a GPU that cannot be opened, out of device memory.
    Device,
    /// Reading or writing a file the caller named (not the model's), or the network.
    Io,
    /// Too much work queued already: the same request may succeed later.
    Overloaded,
    /// Anything else: a bug, or a failure inside a library we call.
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{message}")]
    Message { kind: ErrorKind, message: String },
    #[error("{context}: {source}")]
    Context {
        context: String,
        #[source]
        source: Box<Error>,
    },
    #[error("{}", candle_message(.0))]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl fmt::Display) -> Self {
        Self::Message {
            kind,
            message: message.to_string(),
        }
    }

    /// The model's files are at fault.
    pub fn model(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Model, message)
    }

    /// The caller's request is at fault.
    pub fn input(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Input, message)
    }

    pub fn device(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Device, message)
    }

    pub fn internal(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Message { kind, .. } => *kind,
            Self::Context { source, .. } => source.kind(),
            Self::Candle(e) => candle_kind(e),
            Self::Io(_) => ErrorKind::Io,
        }
    }

    /// The same error, counted as `kind` (e.g. a candle error while loading is the model's).
    pub fn with_kind(self, kind: ErrorKind) -> Self {
        match self {
            Self::Message { message, .. } => Self::Message { kind, message },
            Self::Context { context, source } => Self::Context {
                context,
                source: Box::new(source.with_kind(kind)),
            },
            other => Self::Message {
                kind,
                message: other.to_string(),
            },
        }
    }
}

/// A candle error's text without the backtrace candle captures under `RUST_BACKTRACE`.
pub(crate) fn candle_message(e: &candle_core::Error) -> String {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } => candle_message(inner),
        E::Context { inner, context } => format!("{context}: {}", candle_message(inner)),
        E::WithPath { inner, path } => format!("{}: {}", path.display(), candle_message(inner)),
        e => e.to_string(),
    }
}

/// For model code on candle's `Result` calling the library (the message is kept, not the kind).
impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        candle_core::Error::Msg(e.to_string())
    }
}

fn candle_kind(e: &candle_core::Error) -> ErrorKind {
    use candle_core::Error as E;
    match e {
        E::Context { inner, .. } | E::WithBacktrace { inner, .. } => candle_kind(inner),
        E::Cuda(_) | E::NotCompiledWithCudaSupport => ErrorKind::Device,
        E::Io(_) => ErrorKind::Io,
        _ => ErrorKind::Internal,
    }
}

/// `anyhow`-style context on any result whose error converts into [`Error`].
pub trait Context<T> {
    fn context(self, context: impl fmt::Display) -> Result<T>;
    fn with_context<C: fmt::Display>(self, context: impl FnOnce() -> C) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context(self, context: impl fmt::Display) -> Result<T> {
        self.with_context(|| context)
    }

    fn with_context<C: fmt::Display>(self, context: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|e| Error::Context {
            context: context().to_string(),
            source: Box::new(e.into()),
        })
    }
}

/// `bail!`-like early return with a kinded error: `fail!(Input, "prompt is empty")`.
#[macro_export]
macro_rules! fail {
    ($kind:ident, $($arg:tt)*) => {
        return Err($crate::Error::new($crate::ErrorKind::$kind, format!($($arg)*)))
    };
}
