//! Signed admin request bodies, read whole before the handler runs and hashed as they arrive,
//! for SigV4. The AWS CLI and boto3 never sign a payload's hash (`x-amz-content-sha256`), so their
//! bodies (a CSV import among them) can only be checked once read. The head is checked first
//! (known access key, scope, date); then such bodies draw on one budget of bytes for the whole
//! listener, so that clients without the secret cannot make the admin API hold more than that.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::AdminError;

/// Largest admin request body (CSV imports included): AWS's payload limit.
pub(crate) const MAX_BODY: usize = 10 * 1024 * 1024;
/// How long a client has to send a request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// The bytes of bodies not yet verified that the listener holds at once, and how long a body
/// waits for its share before the answer is 503.
#[derive(Debug)]
pub(crate) struct UnverifiedBudget {
    bytes: Arc<Semaphore>,
    wait: Duration,
}

impl Default for UnverifiedBudget {
    /// Two full-size imports at once; a third waits up to five seconds.
    fn default() -> Self {
        Self::new(2 * MAX_BODY, Duration::from_secs(5))
    }
}

impl UnverifiedBudget {
    pub(crate) fn new(bytes: usize, wait: Duration) -> Self {
        Self {
            bytes: Arc::new(Semaphore::new(bytes)),
            wait,
        }
    }

    /// `n` more bytes of `held`, waiting for them at most `wait`.
    async fn take(
        &self,
        held: &mut Option<OwnedSemaphorePermit>,
        n: usize,
    ) -> Result<(), AdminError> {
        if n == 0 {
            return Ok(());
        }
        let n = u32::try_from(n).map_err(|_| too_large())?;
        let more = tokio::time::timeout(self.wait, self.bytes.clone().acquire_many_owned(n))
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or(AdminError::ServiceUnavailable(1))?;
        match held {
            Some(permit) => permit.merge(more),
            None => *held = Some(more),
        }
        Ok(())
    }
}

/// A body read whole.
pub(crate) struct ReadBody {
    pub(crate) bytes: Bytes,
    /// Its SHA-256, hex, as SigV4 hashes a payload.
    pub(crate) sha256: String,
    /// Its share of the [`UnverifiedBudget`], held until the signature over it checks out.
    pub(crate) _held: Option<OwnedSemaphorePermit>,
}

fn too_large() -> AdminError {
    AdminError::TooLarge(format!(
        "Request Too Long: the body is over {MAX_BODY} bytes"
    ))
}

/// Reads `body` whole (its `Content-Length` is `declared`, when it gave one), up to [`MAX_BODY`].
/// With `budget`, the body is not verified yet: its bytes are taken from the budget before they
/// are read (all at once when declared).
pub(crate) async fn read(
    body: Body,
    declared: Option<u64>,
    budget: Option<&UnverifiedBudget>,
) -> Result<ReadBody, AdminError> {
    let declared = match declared.map(usize::try_from) {
        Some(Ok(n)) if n <= MAX_BODY => Some(n),
        Some(_) => return Err(too_large()),
        None => None,
    };
    let mut held = None;
    if let (Some(budget), Some(n)) = (budget, declared) {
        budget.take(&mut held, n).await?;
    }
    let reading = async {
        let mut body = body;
        let mut bytes = BytesMut::with_capacity(declared.unwrap_or(0));
        let mut hash = Sha256::new();
        while let Some(frame) = body.frame().await {
            let frame = frame
                .map_err(|_| AdminError::BadRequest("The request body could not be read".into()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let total = bytes.len() + data.len();
            if total > MAX_BODY {
                return Err(too_large());
            }
            if let Some(budget) = budget {
                let have = held.as_ref().map_or(0, OwnedSemaphorePermit::num_permits);
                budget.take(&mut held, total.saturating_sub(have)).await?;
            }
            hash.update(&data);
            bytes.extend_from_slice(&data);
        }
        Ok(ReadBody {
            bytes: bytes.freeze(),
            sha256: hex::encode(hash.finalize()),
            _held: held,
        })
    };
    tokio::time::timeout(BODY_TIMEOUT, reading)
        .await
        .unwrap_or_else(|_| {
            Err(AdminError::BadRequest(
                "The request body did not arrive in time".into(),
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunked(parts: &'static [&'static [u8]]) -> Body {
        let frames = parts.iter().copied().map(|p| {
            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from_static(p)))
        });
        Body::new(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )))
    }

    #[tokio::test]
    async fn bodies_are_hashed_as_sigv4_hashes_them_and_capped() {
        let read = read(chunked(&[b"name,key", b",enabled\n"]), None, None)
            .await
            .unwrap_or_else(|_| panic!("read"));
        assert_eq!(&read.bytes[..], b"name,key,enabled\n");
        assert_eq!(
            read.sha256,
            crate::sigv4::payload_hash(b"name,key,enabled\n")
        );
        let over = Some(MAX_BODY as u64 + 1);
        assert!(matches!(
            super::read(Body::empty(), over, None).await,
            Err(AdminError::TooLarge(_))
        ));
    }

    #[tokio::test]
    async fn unverified_bodies_share_a_budget_and_wait_for_it_or_get_503() {
        let budget = UnverifiedBudget::new(10, Duration::from_millis(200));
        // A declared body takes its share before it is read and keeps it.
        let first = read(chunked(&[b"12345678"]), Some(8), Some(&budget))
            .await
            .unwrap_or_else(|_| panic!("first"));
        // Another does not fit: it waits, then is refused.
        let second = read(chunked(&[b"12345678"]), Some(8), Some(&budget)).await;
        assert!(matches!(second, Err(AdminError::ServiceUnavailable(1))));
        // Nor does an undeclared one, once it grows past what is left.
        let third = read(chunked(&[b"12", b"345"]), None, Some(&budget)).await;
        assert!(matches!(third, Err(AdminError::ServiceUnavailable(1))));
        // Once the first is verified (its share dropped), both fit in turn.
        drop(first);
        let fourth = read(chunked(&[b"12", b"345"]), None, Some(&budget))
            .await
            .unwrap_or_else(|_| panic!("fourth"));
        assert_eq!(&fourth.bytes[..], b"12345");
        drop(fourth);
        assert!(
            read(chunked(&[b"12345678"]), Some(8), Some(&budget))
                .await
                .is_ok()
        );
    }
}
