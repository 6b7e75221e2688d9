//! Leader election on a Lease, as client-go's leaderelection does it: a candidate takes the Lease
//! when it does not exist, has no holder, or its record has not changed for the lease duration as
//! this candidate observed it (its own clock, never the holder's timestamps, so clock skew between
//! machines does not matter); the leader renews every retry period and gives up leadership when a
//! renewal has not succeeded within the renew deadline. Every write carries the Lease's
//! resourceVersion, so two candidates can never both win one round.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{api::PostParams, Api, Client};
use tracing::{info, warn};

/// kube-controller-manager's `--leader-elect-*` defaults.
#[derive(Debug, Clone)]
pub struct LeaderConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (kube uses `hostname_uuid`).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl LeaderConfig {
    pub fn new(name: &str, identity: &str) -> Self {
        LeaderConfig {
            namespace: "kube-system".into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lease {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        source: kube::Error,
    },
}

/// What this candidate last saw of the Lease, and when (by its own clock).
#[derive(Debug, Clone, PartialEq)]
struct Observed {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    transitions: Option<i32>,
    at: Instant,
}

pub struct Elector {
    api: Api<Lease>,
    config: LeaderConfig,
    observed: Mutex<Option<Observed>>,
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl Elector {
    pub fn new(client: Client, config: LeaderConfig) -> Self {
        Elector {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: Mutex::new(None),
        }
    }

    pub fn identity(&self) -> &str {
        &self.config.identity
    }

    fn err(&self, source: kube::Error) -> LeaderError {
        LeaderError::Api {
            namespace: self.config.namespace.clone(),
            name: self.config.name.clone(),
            source,
        }
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.config.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// Whether the Lease's record (holder, renew time, transitions) has stood unchanged for a
    /// whole lease duration since this candidate first saw it.
    fn expired(&self, spec: &LeaseSpec) -> bool {
        let now = Instant::now();
        let seen = Observed {
            holder: spec.holder_identity.clone(),
            renew_time: spec.renew_time.clone(),
            transitions: spec.lease_transitions,
            at: now,
        };
        let mut observed = match self.observed.lock() {
            Ok(o) => o,
            Err(e) => e.into_inner(),
        };
        let same = observed.as_ref().is_some_and(|o| {
            o.holder == seen.holder
                && o.renew_time == seen.renew_time
                && o.transitions == seen.transitions
        });
        if !same {
            *observed = Some(seen);
            return false;
        }
        let duration = spec
            .lease_duration_seconds
            .map(|s| Duration::from_secs(u64::try_from(s).unwrap_or(0)))
            .unwrap_or(self.config.lease_duration);
        observed
            .as_ref()
            .is_some_and(|o| now.duration_since(o.at) > duration)
    }

    async fn get(&self) -> Result<Option<Lease>, LeaderError> {
        self.api
            .get_opt(&self.config.name)
            .await
            .map_err(|e| self.err(e))
    }

    /// Writes `lease` back (at the resourceVersion it was read with): false when another
    /// candidate wrote first.
    async fn replace(&self, lease: &Lease) -> Result<bool, LeaderError> {
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if conflict(&e) => Ok(false),
            Err(e) => Err(self.err(e)),
        }
    }

    /// One round: creates, renews or takes the Lease. True when this candidate holds it now.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, LeaderError> {
        let now = MicroTime(Timestamp::now());
        let me = Some(self.config.identity.clone());
        let Some(mut lease) = self.get().await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: me,
                    lease_duration_seconds: Some(self.duration_seconds()),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => {
                    info!(lease = %self.config.name, identity = %self.config.identity, "became the leader (created the lease)");
                    Ok(true)
                }
                Err(e) if conflict(&e) => Ok(false),
                Err(e) => Err(self.err(e)),
            };
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let ours = holder == me;
        if !ours && holder.is_some() && !self.expired(&spec) {
            return Ok(false);
        }
        if !ours {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            spec.holder_identity = me;
        }
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(self.duration_seconds());
        lease.spec = Some(spec);
        let written = self.replace(&lease).await?;
        if written && !ours {
            info!(lease = %self.config.name, identity = %self.config.identity, previous = ?holder, "became the leader");
        }
        Ok(written)
    }

    /// Waits until this candidate leads (errors talking to the API are retried).
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => warn!("{e}; retrying"),
            }
            tokio::time::sleep(self.config.retry_period).await;
        }
    }

    /// Renews every retry period; returns when a renewal has not succeeded within the renew
    /// deadline (or another candidate holds the Lease): leadership is lost, and the caller must
    /// stop acting as leader at once.
    pub async fn hold(&self) {
        let mut last = Instant::now();
        loop {
            tokio::time::sleep(self.config.retry_period).await;
            // A renewal that hangs (an API server that does not answer) counts as failed once
            // the deadline has passed.
            let left = self.config.renew_deadline.saturating_sub(last.elapsed());
            let attempt = tokio::time::timeout(
                left.max(self.config.retry_period),
                self.try_acquire_or_renew(),
            )
            .await;
            match attempt {
                Ok(Ok(true)) => last = Instant::now(),
                Ok(Ok(false)) => {
                    warn!(lease = %self.config.name, "another candidate holds the lease; leadership lost");
                    return;
                }
                Ok(Err(e)) => warn!("{e}; renewing again"),
                Err(_) => warn!(lease = %self.config.name, "renewing the lease timed out"),
            }
            if last.elapsed() > self.config.renew_deadline {
                warn!(lease = %self.config.name, deadline = ?self.config.renew_deadline, "the lease was not renewed in time; leadership lost");
                return;
            }
        }
    }

    /// Gives the Lease up so that another replica takes over at once (on graceful shutdown).
    pub async fn release(&self) -> Result<(), LeaderError> {
        let Some(mut lease) = self.get().await? else {
            return Ok(());
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        lease.spec = Some(spec);
        // A conflict means another candidate has written it meanwhile: nothing left to give up.
        self.replace(&lease).await.map(|_| ())
    }
}
