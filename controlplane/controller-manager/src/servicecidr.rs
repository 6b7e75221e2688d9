//! The ServiceCIDR controller (kube-controller-manager's "service-cidr-controller"): every
//! ServiceCIDR carries the `networking.k8s.io/service-cidr-finalizer` and a Ready condition. A
//! deleted one stays, Ready=False with reason Terminating, while some cluster IP the allocator
//! gave out of it lies in no other ServiceCIDR, so no Service is left with an address outside
//! every range; it goes once those Services are gone or another range covers their addresses.
//! The API server allocates from no range that is being deleted.

use std::{net::IpAddr, sync::Arc, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::{
    api::networking::v1::{IPAddress, ServiceCIDR},
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    api::{ListParams, Patch, PatchParams},
    runtime::{controller::Action, reflector::ObjectRef, reflector::Store, watcher, Controller},
    Api, Client, ResourceExt as _,
};
use seine_apimachinery::cidr::IpCidr;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics;

pub const FINALIZER: &str = "networking.k8s.io/service-cidr-finalizer";
const MANAGED_BY_LABEL: &str = "ipaddress.kubernetes.io/managed-by";
/// The API server's allocator, which labels the IPAddresses it writes so.
const ALLOCATOR: &str = "ipallocator.k8s.io";
const READY: &str = "Ready";
const TERMINATING: &str = "Terminating";
/// How long a deleted range stays once nothing holds it: an allocation that read the ranges
/// before the deletion must have landed by then. The API server reads them on every write, so
/// this is one request's length with ample room (kube waits 10 s for its informers).
const GRACE: Duration = Duration::from_secs(5);
/// How often a held deletion looks again besides on IPAddress and ServiceCIDR events.
const RECHECK: Duration = Duration::from_secs(10);

fn prefixes(cidr: &ServiceCIDR) -> Vec<IpCidr> {
    cidr.spec
        .as_ref()
        .and_then(|s| s.cidrs.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|c| IpCidr::parse(c).ok())
        .collect()
}

/// The first of `addresses` that deleting a range of `own` prefixes would leave in no range of
/// `others` (the ServiceCIDRs that stay).
fn orphaned<'a>(own: &[IpCidr], others: &[IpCidr], addresses: &'a [IpAddr]) -> Option<&'a IpAddr> {
    addresses.iter().find(|ip| {
        own.iter().any(|p| p.contains_ip(**ip)) && !others.iter().any(|o| o.contains_ip(**ip))
    })
}

struct Context {
    client: Client,
    cidrs: Store<ServiceCIDR>,
}

impl Context {
    /// The ranges of every other ServiceCIDR that is not being deleted.
    fn others(&self, name: &str) -> Vec<IpCidr> {
        self.cidrs
            .state()
            .iter()
            .filter(|c| c.name_any() != name && c.metadata.deletion_timestamp.is_none())
            .flat_map(|c| prefixes(c))
            .collect()
    }

    /// The ServiceCIDRs being deleted that `affects` says a change may unblock.
    fn terminating(&self, affects: impl Fn(&[IpCidr]) -> bool) -> Vec<ObjectRef<ServiceCIDR>> {
        self.cidrs
            .state()
            .iter()
            .filter(|c| c.metadata.deletion_timestamp.is_some() && affects(&prefixes(c)))
            .map(|c| ObjectRef::from_obj(c.as_ref()))
            .collect()
    }
}

/// Runs the controller until its watches end.
pub async fn run(client: Client, shutdown: CancellationToken) {
    let cidrs: Api<ServiceCIDR> = Api::all(client.clone());
    let addresses: Api<IPAddress> = Api::all(client.clone());
    let controller = Controller::new(cidrs.clone(), watcher::Config::default())
        .graceful_shutdown_on(shutdown.cancelled_owned());
    let ctx = Arc::new(Context {
        client,
        cidrs: controller.store(),
    });
    let (by_address, by_range) = (ctx.clone(), ctx.clone());
    controller
        // An address released may let the ranges that held it go.
        .watches(
            addresses,
            watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={ALLOCATOR}")),
            move |ip: IPAddress| match ip.name_any().parse::<IpAddr>() {
                Ok(ip) => by_address.terminating(|own| own.iter().any(|p| p.contains_ip(ip))),
                Err(_) => Vec::new(),
            },
        )
        // A range added (or gone) may cover (or stop covering) the addresses of another.
        .watches(cidrs, watcher::Config::default(), move |changed| {
            let changed = prefixes(&changed);
            by_range.terminating(|own| {
                own.iter()
                    .any(|p| changed.iter().any(|c| c.contains(p) || p.contains(c)))
            })
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                debug!("service-cidr controller: {e}");
            }
        })
        .await;
}

fn error_policy(cidr: Arc<ServiceCIDR>, error: &kube::Error, _: Arc<Context>) -> Action {
    warn!(servicecidr = %cidr.name_any(), "service-cidr controller: {error}");
    metrics::synced("service-cidr", false);
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile(cidr: Arc<ServiceCIDR>, ctx: Arc<Context>) -> Result<Action, kube::Error> {
    let api: Api<ServiceCIDR> = Api::all(ctx.client.clone());
    let name = cidr.name_any();
    let ours = cidr.finalizers().iter().any(|f| f == FINALIZER);
    let Some(deleted) = &cidr.metadata.deletion_timestamp else {
        if !ours {
            let patch = json!({"metadata": {"finalizers": [FINALIZER]}});
            ignore_gone(
                api.patch(&name, &PatchParams::default(), &Patch::Strategic(patch))
                    .await,
            )?;
        }
        set_ready(&api, &cidr, "True", "", "Kubernetes Service CIDR is ready").await?;
        metrics::synced("service-cidr", true);
        return Ok(Action::await_change());
    };
    if !ours {
        return Ok(Action::await_change());
    }
    let own = prefixes(&cidr);
    let others = ctx.others(&name);
    // A range inside a range that stays orphans nothing; otherwise look at the addresses.
    if !own.iter().all(|p| others.iter().any(|o| o.contains(p))) {
        let ips: Api<IPAddress> = Api::all(ctx.client.clone());
        let listed = ips
            .list(&ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={ALLOCATOR}")))
            .await?;
        let addresses: Vec<IpAddr> = listed
            .items
            .iter()
            .filter_map(|ip| ip.name_any().parse().ok())
            .collect();
        if let Some(ip) = orphaned(&own, &others, &addresses) {
            info!(servicecidr = %name, address = %ip, "deletion waits: the address is in no other ServiceCIDR");
            set_ready(
                &api,
                &cidr,
                "False",
                TERMINATING,
                "There are still IPAddresses referencing the ServiceCIDR, please remove them or create a new ServiceCIDR",
            )
            .await?;
            metrics::synced("service-cidr", true);
            return Ok(Action::requeue(RECHECK));
        }
    }
    let since = Duration::try_from(Timestamp::now().duration_since(deleted.0)).unwrap_or_default();
    if since < GRACE {
        return Ok(Action::requeue(GRACE - since));
    }
    let patch = json!({"metadata": {"$deleteFromPrimitiveList/finalizers": [FINALIZER]}});
    ignore_gone(
        api.patch(&name, &PatchParams::default(), &Patch::Strategic(patch))
            .await,
    )?;
    info!(servicecidr = %name, "deleted: no cluster IP is left outside the other ranges");
    metrics::synced("service-cidr", true);
    Ok(Action::await_change())
}

/// A write to an object deleted meanwhile has nothing left to do.
fn ignore_gone<T>(result: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes the Ready condition unless it already says this (its transition time moves only when
/// its status does).
async fn set_ready(
    api: &Api<ServiceCIDR>,
    cidr: &ServiceCIDR,
    status: &str,
    reason: &str,
    message: &str,
) -> Result<(), kube::Error> {
    let current = cidr
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == READY));
    if current.is_some_and(|c| c.status == status && c.reason == reason && c.message == message) {
        return Ok(());
    }
    let condition = Condition {
        type_: READY.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: match current {
            Some(c) if c.status == status => c.last_transition_time.clone(),
            _ => Time(Timestamp::now()),
        },
        observed_generation: cidr.metadata.generation,
    };
    let patch = json!({"status": {"conditions": [condition]}});
    ignore_gone(
        api.patch_status(
            &cidr.name_any(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(cidr: &str) -> IpCidr {
        IpCidr::parse(cidr).unwrap()
    }

    #[test]
    fn a_deleted_range_is_held_by_an_address_no_other_range_has() {
        let own = [p("10.100.0.0/24"), p("fd00:1::/112")];
        let addresses: Vec<IpAddr> = ["10.96.0.1", "10.100.0.10", "fd00:1::5"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let held = orphaned(&own, &[p("10.96.0.0/16")], &addresses);
        assert_eq!(
            held.map(ToString::to_string).as_deref(),
            Some("10.100.0.10")
        );
        let held = orphaned(&own, &[p("10.100.0.0/16")], &addresses);
        assert_eq!(held.map(ToString::to_string).as_deref(), Some("fd00:1::5"));
        let covered = [p("10.100.0.0/16"), p("fd00:1::/108")];
        assert_eq!(orphaned(&own, &covered, &addresses), None);
        assert_eq!(orphaned(&own, &[], &addresses[..1]), None);
    }
}
