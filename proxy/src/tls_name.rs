//! The server name (SNI) a TLS client asked for. pingora's TLS digest has no field for it, so a
//! handshake callback stores it in the digest's extension slot, once per connection; both
//! request paths read it from there for the access log.

use std::any::Any;
use std::sync::Arc;

use async_trait::async_trait;
use pingora::listeners::TlsAccept;
use pingora::protocols::tls::{SslDigest, TlsRef};

/// The SNI name of a TLS connection, as the client sent it.
#[derive(Debug)]
pub struct ServerName(pub String);

/// Handshake callbacks that record the client's SNI name (see [`server_name`]).
#[derive(Debug)]
pub struct RecordServerName;

#[async_trait]
impl TlsAccept for RecordServerName {
    async fn handshake_complete_callback(
        &self,
        tls: &TlsRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        let name = tls.server_name()?;
        Some(Arc::new(ServerName(name.to_string())))
    }
}

/// The SNI name recorded for the connection `digest` belongs to, if the client sent one.
pub fn server_name(digest: &SslDigest) -> Option<&str> {
    digest.extension.get::<ServerName>().map(|n| n.0.as_str())
}
