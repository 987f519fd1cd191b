//! The asset catalog.

use super::Harness;
use crate::{AssetCatalog, AssetKind, AssetRecord};

fn asset(id: &str, kind: AssetKind, initrd: Option<&str>) -> AssetRecord {
    AssetRecord {
        id: id.into(),
        kind,
        file_name: format!("{id}.img"),
        size_bytes: 3 << 30,
        sha256: "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad".into(),
        initrd_id: initrd.map(String::from),
        ready_marker: None,
        created_at_ms: 1_700_000_000_000,
        owner: None,
    }
}

/// Every field of an asset of each kind reads back as inserted; an unknown id reads as none.
pub fn asset_records_read_back_as_saved<H: Harness>(h: &H) {
    let store = h.open();
    let initrd = asset("ird", AssetKind::Initrd, None);
    let kernel = asset("k", AssetKind::Kernel, Some("ird"));
    let rootfs = AssetRecord {
        ready_marker: Some("METALD_GUEST_READY".into()),
        size_bytes: 0,
        owner: Some("acme".into()),
        ..asset("r", AssetKind::Rootfs, None)
    };
    for a in [&initrd, &kernel, &rootfs] {
        store.insert_asset(a).unwrap();
    }
    for a in [initrd, kernel, rootfs] {
        assert_eq!(store.get_asset(&a.id).unwrap(), Some(a));
    }
    assert_eq!(store.get_asset("nope").unwrap(), None);
}

/// The catalog lists every asset sorted by id, whatever the insert order.
pub fn assets_list_by_id<H: Harness>(h: &H) {
    let store = h.open();
    assert!(store.list_assets().unwrap().is_empty());
    for id in ["m", "b", "z", "a"] {
        store
            .insert_asset(&asset(id, AssetKind::Rootfs, None))
            .unwrap();
    }
    let ids: Vec<String> = store
        .list_assets()
        .unwrap()
        .into_iter()
        .map(|a| a.id)
        .collect();
    assert_eq!(ids, ["a", "b", "m", "z"]);
}

/// A second asset with a stored id is refused and the first stays as it was.
pub fn a_duplicate_asset_id_is_refused<H: Harness>(h: &H) {
    let store = h.open();
    let first = asset("r", AssetKind::Rootfs, None);
    store.insert_asset(&first).unwrap();
    assert!(store
        .insert_asset(&asset("r", AssetKind::Kernel, None))
        .is_err());
    assert_eq!(store.list_assets().unwrap(), vec![first]);
}

/// The kernels naming an initrd are found, sorted, and only those.
pub fn kernels_using_an_initrd_are_found<H: Harness>(h: &H) {
    let store = h.open();
    for a in [
        asset("ird", AssetKind::Initrd, None),
        asset("ird2", AssetKind::Initrd, None),
        asset("k2", AssetKind::Kernel, Some("ird")),
        asset("k1", AssetKind::Kernel, Some("ird")),
        asset("k3", AssetKind::Kernel, Some("ird2")),
        asset("k4", AssetKind::Kernel, None),
    ] {
        store.insert_asset(&a).unwrap();
    }
    assert_eq!(store.assets_using_initrd("ird").unwrap(), ["k1", "k2"]);
    assert_eq!(store.assets_using_initrd("ird2").unwrap(), ["k3"]);
    assert!(store.assets_using_initrd("k4").unwrap().is_empty());
    assert!(store.assets_using_initrd("nope").unwrap().is_empty());
    store.delete_asset("k1").unwrap();
    assert_eq!(store.assets_using_initrd("ird").unwrap(), ["k2"]);
}

/// A kernel never names a missing initrd: inserting one that does is refused, and so is
/// deleting an initrd a kernel still names.
pub fn initrd_references_stay_valid<H: Harness>(h: &H) {
    let store = h.open();
    assert!(store
        .insert_asset(&asset("k", AssetKind::Kernel, Some("ird")))
        .is_err());
    assert_eq!(store.get_asset("k").unwrap(), None);
    store
        .insert_asset(&asset("ird", AssetKind::Initrd, None))
        .unwrap();
    store
        .insert_asset(&asset("k", AssetKind::Kernel, Some("ird")))
        .unwrap();
    assert!(store.delete_asset("ird").is_err());
    assert!(store.get_asset("ird").unwrap().is_some());
    store.delete_asset("k").unwrap();
    store.delete_asset("ird").unwrap();
    assert!(store.list_assets().unwrap().is_empty());
}

/// A deleted asset is gone; deleting a missing one is not an error.
pub fn delete_removes_the_asset<H: Harness>(h: &H) {
    let store = h.open();
    store
        .insert_asset(&asset("a", AssetKind::Rootfs, None))
        .unwrap();
    store
        .insert_asset(&asset("b", AssetKind::Rootfs, None))
        .unwrap();
    store.delete_asset("a").unwrap();
    store.delete_asset("a").unwrap();
    store.delete_asset("never").unwrap();
    assert_eq!(store.get_asset("a").unwrap(), None);
    assert_eq!(
        store.list_assets().unwrap(),
        vec![asset("b", AssetKind::Rootfs, None)]
    );
}

/// The catalog is still there after a restart.
pub fn assets_survive_reopen<H: Harness>(h: &H) {
    let a = asset("r", AssetKind::Rootfs, None);
    h.open().insert_asset(&a).unwrap();
    assert_eq!(h.open().list_assets().unwrap(), vec![a]);
}
