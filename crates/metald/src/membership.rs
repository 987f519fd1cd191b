//! This host's membership in its fleet: it registers in the shared store at start (which gives
//! it its place, and so its address blocks), renews its lease while it runs, and ends the lease
//! at a clean stop. A host on SQLite is a fleet of one and does the same, so `GetFleet` reads
//! alike everywhere.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::FleetSettings;
use crate::fleet::{FleetPrefixes, HostCapacity, HostId, HostRecord, HostRegistration};
use crate::network::ipam::{Ipv4Subnet, Ipv6Prefix};
use crate::report::Chain;
use crate::store::{StateStore, StoreError};

/// This host in the fleet.
pub struct Membership {
    store: Arc<dyn StateStore>,
    registration: Mutex<HostRegistration>,
    prefixes: Option<FleetPrefixes>,
    lease: Duration,
}

impl Membership {
    /// Registers this host (its capacity is reported later, once measured) and returns its
    /// record: a known host keeps its place.
    pub fn join(
        store: Arc<dyn StateStore>,
        settings: &FleetSettings,
    ) -> Result<(Arc<Self>, HostRecord), StoreError> {
        let me = Arc::new(Self {
            store,
            registration: Mutex::new(HostRegistration {
                id: settings.host_id.clone(),
                advertise_url: settings.advertise_url.clone().unwrap_or_default(),
                capacity: HostCapacity::default(),
                labels: settings.labels.clone(),
            }),
            prefixes: settings.prefixes,
            lease: settings.lease,
        });
        let record = me.register()?;
        Ok((me, record))
    }

    fn registration(&self) -> HostRegistration {
        self.registration
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn register(&self) -> Result<HostRecord, StoreError> {
        let places = self.prefixes.map_or(u64::MAX, |p| p.capacity());
        self.store
            .register_host(&self.registration(), places, self.lease)
    }

    /// This host's id.
    pub fn host_id(&self) -> HostId {
        self.registration().id
    }

    /// The address blocks of the host at `index`, when the fleet has an address space.
    pub fn blocks(&self, index: u64) -> Option<(Ipv6Prefix, Option<Ipv4Subnet>)> {
        self.prefixes.and_then(|p| p.host_blocks(index))
    }

    /// Reports the host's measured capacity to the fleet.
    pub fn set_capacity(&self, capacity: HostCapacity) -> Result<(), StoreError> {
        self.registration
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .capacity = capacity;
        self.register().map(drop)
    }

    /// Every host of the fleet.
    pub fn hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        self.store.list_hosts()
    }

    /// Renews the lease three times per lease, for as long as the runtime runs. A renewal that
    /// finds no registration (an operator removed it) registers again; a failing store is
    /// logged once per outage, and the host shows DOWN to its peers until it recovers.
    pub fn keep_lease(self: &Arc<Self>) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut failing = false;
            let mut tick = tokio::time::interval(me.lease / 3);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let m = Arc::clone(&me);
                let renewed = tokio::task::spawn_blocking(move || {
                    match m.store.renew_lease(&m.host_id(), m.lease) {
                        Ok(false) => m.register().map(drop),
                        other => other.map(drop),
                    }
                })
                .await;
                match renewed {
                    Ok(Ok(())) if failing => {
                        failing = false;
                        tracing::info!("host lease renewed again");
                    }
                    Ok(Ok(())) => {}
                    Ok(Err(e)) if !failing => {
                        failing = true;
                        tracing::error!(error = %Chain(&e), "host lease cannot be renewed; peers will see this host DOWN until it is");
                    }
                    Ok(Err(_)) => {}
                    Err(e) => tracing::error!(error = %e, "host lease renewal panicked"),
                }
            }
        });
    }

    /// Ends the lease at a clean stop, so peers see this host DOWN at once.
    pub async fn leave(self: &Arc<Self>) {
        let me = Arc::clone(self);
        match tokio::task::spawn_blocking(move || me.store.end_lease(&me.host_id())).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %Chain(&e), "host lease not ended; it runs out on its own")
            }
            Err(e) => tracing::warn!(error = %e, "ending the host lease panicked"),
        }
    }
}
