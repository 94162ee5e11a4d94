//! Clients of the legacy servers behind mailgate.

pub mod probe;
pub mod reply;
pub mod smtp;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Nothing listening, DNS failure, connect timeout, or a refusing greeting.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The connection broke or a reply did not come in time.
    #[error("backend connection failed: {0}")]
    Failed(String),
    /// The backend said something that is not valid here.
    #[error("backend protocol error: {0}")]
    Protocol(String),
}

impl From<crate::codec::CodecError> for BackendError {
    fn from(e: crate::codec::CodecError) -> Self {
        match e {
            crate::codec::CodecError::TooLong(_) => {
                BackendError::Protocol("reply line too long".into())
            }
            other => BackendError::Failed(other.to_string()),
        }
    }
}

/// Connects with TCP_NODELAY under a deadline; `address` is `host:port`.
pub async fn connect(
    address: &str,
    deadline: std::time::Duration,
) -> Result<tokio::net::TcpStream, BackendError> {
    match tokio::time::timeout(deadline, tokio::net::TcpStream::connect(address)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(BackendError::Unavailable(format!("{address}: {e}"))),
        Err(_) => Err(BackendError::Unavailable(format!(
            "{address}: connect timed out"
        ))),
    }
}
