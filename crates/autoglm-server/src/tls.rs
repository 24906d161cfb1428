//! TLS through rustls (ring provider), optionally mutual: with a client CA
//! only clients presenting a certificate signed by it complete the
//! handshake.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain of the server.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates; when set, clients must present a certificate
    /// signed by one of them.
    pub client_ca: Option<PathBuf>,
}

fn bad(what: &str, path: &std::path::Path, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("{what} {}: {e}", path.display()),
    )
}

impl TlsFiles {
    pub fn server_config(&self) -> std::io::Result<ServerConfig> {
        let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|i| i.collect::<Result<_, _>>())
            .map_err(|e| bad("--tls-cert", &self.cert, e))?;
        if certs.is_empty() {
            return Err(bad(
                "--tls-cert",
                &self.cert,
                "no PEM certificate in the file",
            ));
        }
        let key =
            PrivateKeyDer::from_pem_file(&self.key).map_err(|e| bad("--tls-key", &self.key, e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("TLS", &self.cert, e))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in
                    CertificateDer::pem_file_iter(ca).map_err(|e| bad("--tls-client-ca", ca, e))?
                {
                    roots
                        .add(c.map_err(|e| bad("--tls-client-ca", ca, e))?)
                        .map_err(|e| bad("--tls-client-ca", ca, e))?;
                }
                if roots.is_empty() {
                    return Err(bad("--tls-client-ca", ca, "no PEM certificate in the file"));
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| bad("--tls-client-ca", ca, e))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut cfg = builder
            .with_single_cert(certs, key)
            .map_err(|e| bad("--tls-cert/--tls-key", &self.cert, e))?;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(cfg)
    }
}
