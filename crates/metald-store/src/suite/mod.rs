//! One test suite for every store implementation, written against [`StateStore`] only.
//!
//! An implementation runs it with [`store_suite!`](crate::store_suite) and a [`Harness`] that
//! opens its stores; every test builds its own harness, so it starts from an empty database.
//! The tests are grouped by table, as the store is. What only one engine has (its files, its
//! migrations, rows it cannot parse) is tested beside that engine, not here.

// A failed unwrap is the test failing, with the error in the panic message.
#![allow(clippy::unwrap_used)]

pub mod asset_records;
pub mod fleet;
pub mod ipam;
pub mod outbox;
pub mod snapshots;
pub mod usage;
pub mod vms;

use crate::domain::{CustomerId, VmRecord};
use crate::state::VmState;
use crate::StateStore;
use metald_domain::ipam::AllocationPlan;
use metald_domain::usage::Counters;

/// What the suite needs from an engine: one empty database per harness, opened as often as a
/// test asks.
pub trait Harness {
    /// The store under test.
    type Store: StateStore;

    /// Opens a store on this harness's database. Opening again after dropping the first store
    /// is a restart: everything committed must still be there.
    fn open(&self) -> Self::Store;
}

/// The suite's test names, read from its source, so [`store_suite!`](crate::store_suite) can
/// check that its list misses none.
#[doc(hidden)]
pub fn test_names() -> Vec<&'static str> {
    let sources = [
        include_str!("vms.rs"),
        include_str!("ipam.rs"),
        include_str!("usage.rs"),
        include_str!("outbox.rs"),
        include_str!("asset_records.rs"),
        include_str!("snapshots.rs"),
        include_str!("fleet.rs"),
    ];
    let mut names: Vec<&str> = sources
        .iter()
        .flat_map(|s| s.lines())
        .filter_map(|l| l.strip_prefix("pub fn "))
        .filter_map(|l| l.split_once("<H: Harness>").map(|(name, _)| name))
        .collect();
    names.sort_unstable();
    names
}

/// Instantiates every suite test as a `#[test]` in the calling module, each with a fresh
/// harness from `$harness` (an expression evaluated once per test), e.g.
/// `metald_store::store_suite!(Sqlite::new());`, plus `store_suite_lists_every_test`, which
/// fails when a suite test is missing from the list below.
///
/// `store_suite!(list: H)` is instead a `Vec<(&'static str, fn(&H))>` of every suite test
/// (`"table::test"` and the test for harness type `H`), for a test binary that builds its own
/// trials (e.g. with libtest-mimic, to skip at run time).
#[macro_export]
macro_rules! store_suite {
    (@each $harness:expr; $($table:ident :: $test:ident),+ $(,)?) => {
        #[test]
        fn store_suite_lists_every_test() {
            let mut listed = vec![$(stringify!($test)),+];
            listed.sort_unstable();
            assert_eq!(listed, $crate::suite::test_names());
        }
        $(
            #[test]
            fn $test() {
                $crate::suite::$table::$test(&$harness);
            }
        )+
    };
    (@list $h:ty; $($table:ident :: $test:ident),+ $(,)?) => {
        vec![$((
            concat!(stringify!($table), "::", stringify!($test)),
            $crate::suite::$table::$test::<$h> as fn(&$h),
        )),+]
    };
    (@tests $mode:ident $arg:tt) => {
        $crate::store_suite! { @$mode $arg;
            vms::inserted_vms_read_back_as_saved,
            vms::update_writes_only_the_mutable_fields,
            vms::a_missing_vm_updates_and_deletes_without_error,
            vms::another_customers_vm_is_indistinguishable_from_a_missing_one,
            vms::list_pages_by_seq_oldest_first,
            vms::list_filters_by_state,
            vms::all_vms_lists_every_customer_oldest_first,
            vms::count_by_state_leaves_out_empty_states,
            vms::a_duplicate_vm_id_is_refused,
            vms::delete_removes_the_vm,
            vms::vms_survive_reopen,
            vms::disks_are_durable_only_once_recorded,
            vms::the_stored_vm_quota_is_never_overshot,
            vms::running_quotas_admit_exactly_the_limit_and_count_every_running_vm,
            vms::running_vcpu_and_memory_quotas_add_the_boots_own_size,
            vms::the_disk_quota_sums_the_customers_writable_disks,
            vms::host_capacity_admits_exactly_what_fits_under_concurrent_boots,
            vms::released_stopped_and_deleted_vms_free_host_capacity,
            vms::the_kept_sums_match_the_vms_through_any_churn,
            ipam::allocation_takes_the_lowest_free_slot_and_addresses,
            ipam::without_a_plan_nothing_is_allocated,
            ipam::an_ipv6_only_plan_gives_no_ipv4,
            ipam::addresses_are_never_handed_out_twice,
            ipam::concurrent_inserts_get_distinct_addresses,
            ipam::delete_frees_the_lowest_for_the_next_vm,
            ipam::a_held_allocation_stays_taken_until_freed,
            ipam::slots_run_out_and_the_failed_insert_stores_nothing,
            ipam::ipv4_addresses_run_out,
            ipam::ipv6_addresses_run_out,
            ipam::allocations_survive_reopen,
            usage::usage_round_trips_and_is_replaced,
            usage::usage_is_per_vm_and_goes_with_it,
            usage::usage_survives_reopen,
            outbox::outbox_keeps_queue_order_and_limit,
            outbox::a_repeated_key_is_queued_once,
            outbox::delete_removes_only_that_row_and_ids_are_not_reused,
            outbox::cursor_moves_with_the_rows,
            outbox::a_batch_the_cursor_passed_writes_nothing,
            outbox::a_refused_cursor_queues_nothing,
            outbox::outbox_rows_outlive_their_vm_but_the_cursor_does_not,
            outbox::outbox_and_cursor_survive_reopen,
            asset_records::asset_records_read_back_as_saved,
            asset_records::assets_list_by_id,
            asset_records::a_duplicate_asset_id_is_refused,
            asset_records::kernels_using_an_initrd_are_found,
            asset_records::initrd_references_stay_valid,
            asset_records::delete_removes_the_asset,
            asset_records::assets_survive_reopen,
            snapshots::snapshots_read_back_only_for_their_owner,
            snapshots::snapshot_quotas_count_snapshots_and_their_bytes,
            snapshots::a_clone_keeps_its_inner_identity_until_forgotten,
            fleet::hosts_read_back_as_registered_in_their_own_places,
            fleet::a_host_keeps_its_place_when_it_registers_again,
            fleet::places_run_out_and_the_refused_host_is_not_stored,
            fleet::a_host_whose_lease_ended_is_down_until_it_renews,
            fleet::hosts_survive_reopen,
        }
    };
    (list: $h:ty) => {
        $crate::store_suite! { @tests list $h }
    };
    ($harness:expr) => {
        $crate::store_suite! { @tests each $harness }
    };
}

fn customer(name: &str) -> CustomerId {
    name.parse().unwrap()
}

/// A new VM of `customer`, as the service would insert it.
fn vm(customer: &str) -> VmRecord {
    crate::testing::record(customer, VmState::Created)
}

fn plan(slots: u32, ipv6: &str, ipv4: Option<&str>) -> AllocationPlan {
    AllocationPlan {
        slots,
        ipv6: ipv6.parse().unwrap(),
        ipv4: ipv4.map(|s| s.parse().unwrap()),
    }
}

/// Counters with a different value in every field, so a swapped column shows.
fn counters(n: u64) -> Counters {
    Counters {
        cpu_ns: n,
        memory_bytes: n + 1,
        disk_read_bytes: n + 2,
        disk_write_bytes: n + 3,
        disk_read_ops: n + 4,
        disk_write_ops: n + 5,
        net_rx_bytes: n + 6,
        net_tx_bytes: n + 7,
        net_rx_packets: n + 8,
        net_tx_packets: n + 9,
    }
}
