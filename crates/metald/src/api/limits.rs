//! Per-customer request rates (a token bucket per verified customer, from the `governor`
//! crate) and the server's cap on how long a call may run, whatever deadline the client sent.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use connectrpc::ConnectError;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use super::auth::Caller;
use crate::config::RequestLimits;
use crate::domain::CustomerId;

/// How often buckets of customers that went quiet are dropped.
const FORGET_EVERY: Duration = Duration::from_secs(60);

/// The token buckets, one per customer that called recently.
pub struct RateLimiter {
    buckets: DefaultKeyedRateLimiter<CustomerId>,
    per_second: u32,
}

impl RateLimiter {
    /// Buckets refilled at `limits.rate_per_second` holding up to `limits.burst`; a task drops
    /// full (idle) buckets every minute so the map holds only active customers.
    pub fn start(limits: &RequestLimits) -> Arc<Self> {
        let rate = NonZeroU32::new(limits.rate_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(limits.burst).unwrap_or(rate);
        let me = Arc::new(Self {
            buckets: governor::RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            per_second: rate.get(),
        });
        let weak = Arc::downgrade(&me);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FORGET_EVERY);
            loop {
                tick.tick().await;
                let Some(me) = weak.upgrade() else { return };
                me.buckets.retain_recent();
                me.buckets.shrink_to_fit();
            }
        });
        me
    }

    /// Takes one request from `customer`'s bucket; `Err` is the whole seconds to wait.
    pub fn admit(&self, customer: &CustomerId) -> Result<(), u64> {
        self.buckets.check_key(customer).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
        })
    }
}

/// Middleware after auth: a verified customer over their rate becomes [`Caller::Throttled`]
/// (`resource_exhausted`, HTTP 429) and the response carries `Retry-After`.
pub async fn throttle(
    State(limiter): State<Arc<RateLimiter>>,
    mut req: Request,
    next: Next,
) -> Response {
    let over = match req.extensions().get::<Caller>() {
        Some(Caller::Verified(id)) => limiter.admit(&id.customer).err(),
        _ => None,
    };
    let Some(secs) = over else {
        return next.run(req).await;
    };
    req.extensions_mut().insert(Caller::Throttled(format!(
        "over the request rate limit of {} per second; retry after {secs} s",
        limiter.per_second
    )));
    let mut resp = next.run(req).await;
    resp.headers_mut()
        .insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
    resp
}

/// Connect and gRPC deadlines: the client's value, at most `max`; `max` when it sent none.
pub fn deadline_policy(max: Duration) -> connectrpc::DeadlinePolicy {
    connectrpc::DeadlinePolicy::new()
        .with_max(max)
        .with_default_timeout(max)
}

/// The same cap for REST routes, which carry no deadline header.
pub async fn rest_deadline(State(max): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(max, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ConnectError::deadline_exceeded(format!(
            "the call took longer than the server's limit of {} s",
            max.as_secs()
        ))
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_customer_has_its_own_bucket() {
        let l = RateLimiter::start(&RequestLimits {
            rate_per_second: 1,
            burst: 3,
            max_deadline: Duration::from_secs(1),
        });
        let a: CustomerId = "a".parse().unwrap();
        let b: CustomerId = "b".parse().unwrap();
        for _ in 0..3 {
            l.admit(&a).unwrap();
        }
        assert_eq!(l.admit(&a), Err(1));
        l.admit(&b).unwrap();
    }
}
