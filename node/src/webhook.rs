//! Webhook delivery: one signed POST per attempt. Retries, backoff and durability belong
//! to the entity outboxes that call this; here an attempt either gets a 2xx or fails.

use std::sync::Arc;
use std::time::Duration;

use convoy_actors::outbox::Webhook;
use convoy_actors::{ErrorCode, Rejection};
use convoy_config::WebhooksConfig;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::Semaphore;

/// The header carrying `sha256=<hex HMAC-SHA256 of the body, keyed with webhooks.secret>`.
pub const SIGNATURE_HEADER: &str = "x-convoy-signature";
pub const EVENT_HEADER: &str = "x-convoy-event";
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

pub struct WebhookSender {
    target: Option<(String, Vec<u8>)>,
    client: reqwest::Client,
    timeout: Duration,
    /// Attempts in flight at once; more fail at once and are retried later.
    in_flight: Arc<Semaphore>,
}

fn unavailable(message: String) -> Rejection {
    Rejection::new(ErrorCode::Unavailable, message)
}

/// `hex(HMAC-SHA256(secret, body))`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

impl WebhookSender {
    pub fn new(cfg: &WebhooksConfig) -> WebhookSender {
        let target = match (&cfg.url, &cfg.secret) {
            (Some(url), Some(secret)) => Some((url.clone(), secret.as_bytes().to_vec())),
            _ => None,
        };
        WebhookSender {
            target,
            client: reqwest::Client::new(),
            timeout: cfg.timeout,
            in_flight: Arc::new(Semaphore::new(cfg.queue)),
        }
    }

    pub async fn post(&self, hook: &Webhook) -> Result<(), Rejection> {
        let Some((url, secret)) = &self.target else { return Ok(()) };
        let Ok(_permit) = self.in_flight.try_acquire() else {
            metrics::counter!("convoy_webhooks_total", "event" => hook.event.clone(), "result" => "busy").increment(1);
            return Err(unavailable("too many webhook deliveries in flight".into()));
        };
        let started = std::time::Instant::now();
        let sent = self
            .client
            .post(url)
            .timeout(self.timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(EVENT_HEADER, &hook.event)
            .header(IDEMPOTENCY_HEADER, &hook.idempotency_key)
            .header(SIGNATURE_HEADER, format!("sha256={}", signature(secret, hook.json.as_bytes())))
            .body(hook.json.clone())
            .send()
            .await;
        metrics::histogram!("convoy_webhook_seconds").record(started.elapsed().as_secs_f64());
        let result = match sent {
            Ok(resp) if resp.status().is_success() => Ok(()),
            Ok(resp) => Err(unavailable(format!("webhook receiver answered {}", resp.status()))),
            Err(e) => Err(unavailable(format!("webhook receiver unreachable: {e}"))),
        };
        let label = if result.is_ok() { "delivered" } else { "failed" };
        metrics::counter!("convoy_webhooks_total", "event" => hook.event.clone(), "result" => label).increment(1);
        if let Err(e) = &result {
            tracing::warn!(event = %hook.event, key = %hook.idempotency_key, error = %e.message, "webhook attempt failed; retried with backoff");
        }
        result
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn signature_is_rfc4231_hmac_sha256() {
        // RFC 4231, test case 2.
        assert_eq!(
            super::signature(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
