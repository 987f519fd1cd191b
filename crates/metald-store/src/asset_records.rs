//! The `assets` table: the catalog of kernels, initrds and disk images. The files themselves
//! are [`crate::assets`]'s.

use crate::Cached as _;
use rusqlite::{params, OptionalExtension, Row};

use crate::{sql, Store, StoreError};

/// Kinds of asset files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssetKind {
    /// A guest kernel (ELF vmlinux or bzImage).
    Kernel,
    /// An initial ramdisk.
    Initrd,
    /// A disk image (root filesystem or extra drive).
    Rootfs,
}

impl AssetKind {
    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            AssetKind::Kernel => "kernel",
            AssetKind::Initrd => "initrd",
            AssetKind::Rootfs => "rootfs",
        }
    }

    /// Parses a stable name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "kernel" => Some(AssetKind::Kernel),
            "initrd" => Some(AssetKind::Initrd),
            "rootfs" => Some(AssetKind::Rootfs),
            _ => None,
        }
    }
}

/// One asset in the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssetRecord {
    /// The image id callers use.
    pub id: String,
    /// What it is.
    pub kind: AssetKind,
    /// File name under the asset directory.
    pub file_name: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Hex sha256 of the content.
    pub sha256: String,
    /// For kernels: the initrd booted with it.
    pub initrd_id: Option<String>,
    /// For root filesystems: the console line that shows the guest is up.
    pub ready_marker: Option<String>,
    /// Import time, Unix milliseconds.
    pub created_at_ms: i64,
    /// The customer it belongs to; `None`: public (every customer may boot it).
    pub owner: Option<String>,
}

/// The asset catalog. A kernel's `initrd_id` always names a stored asset: inserting one that
/// does not, or deleting an initrd a kernel still names, is refused.
pub trait AssetCatalog: Send + Sync {
    /// Adds an asset to the catalog (an id already stored is refused).
    fn insert_asset(&self, a: &AssetRecord) -> Result<(), StoreError>;

    /// One asset by id.
    fn get_asset(&self, id: &str) -> Result<Option<AssetRecord>, StoreError>;

    /// The whole catalog, by id.
    fn list_assets(&self) -> Result<Vec<AssetRecord>, StoreError>;

    /// Removes an asset row (a missing one is not an error).
    fn delete_asset(&self, id: &str) -> Result<(), StoreError>;

    /// Ids of assets (kernels) that name `id` as their initrd, sorted.
    fn assets_using_initrd(&self, id: &str) -> Result<Vec<String>, StoreError>;
}

impl AssetCatalog for Store {
    fn insert_asset(&self, a: &AssetRecord) -> Result<(), StoreError> {
        self.conn()
            .exec(
                "INSERT INTO assets (id, kind, file_name, size_bytes, sha256, initrd_id,
                                     ready_marker, created_at_ms, owner)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    a.id,
                    a.kind.as_str(),
                    a.file_name,
                    a.size_bytes as i64,
                    a.sha256,
                    a.initrd_id,
                    a.ready_marker,
                    a.created_at_ms,
                    a.owner
                ],
            )
            .map_err(sql("insert asset"))?;
        Ok(())
    }

    fn get_asset(&self, id: &str) -> Result<Option<AssetRecord>, StoreError> {
        self.conn()
            .row(
                &format!("SELECT {ASSET_COLUMNS} FROM assets WHERE id = ?1"),
                params![id],
                read_asset_row,
            )
            .optional()
            .map_err(sql("read asset"))?
            .transpose()
    }

    fn list_assets(&self) -> Result<Vec<AssetRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!("SELECT {ASSET_COLUMNS} FROM assets ORDER BY id"))
            .map_err(sql("list assets"))?;
        let rows = stmt
            .query_map([], read_asset_row)
            .map_err(sql("list assets"))?;
        rows.map(|r| r.map_err(sql("list assets")).and_then(|x| x))
            .collect()
    }

    fn delete_asset(&self, id: &str) -> Result<(), StoreError> {
        self.conn()
            .exec("DELETE FROM assets WHERE id = ?1", params![id])
            .map_err(sql("delete asset"))?;
        Ok(())
    }

    fn assets_using_initrd(&self, id: &str) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT id FROM assets WHERE initrd_id = ?1 ORDER BY id")
            .map_err(sql("find initrd users"))?;
        let rows = stmt
            .query_map(params![id], |r| r.get::<_, String>(0))
            .map_err(sql("find initrd users"))?;
        rows.collect::<Result<_, _>>()
            .map_err(sql("find initrd users"))
    }
}

const ASSET_COLUMNS: &str =
    "id, kind, file_name, size_bytes, sha256, initrd_id, ready_marker, created_at_ms, owner";

fn read_asset_row(row: &Row<'_>) -> rusqlite::Result<Result<AssetRecord, StoreError>> {
    let id: String = row.get(0)?;
    let kind: String = row.get(1)?;
    let Some(kind) = AssetKind::parse(&kind) else {
        return Ok(Err(StoreError::Corrupt {
            id,
            reason: format!("asset kind {kind}"),
        }));
    };
    Ok(Ok(AssetRecord {
        id,
        kind,
        file_name: row.get(2)?,
        size_bytes: row.get::<_, i64>(3)? as u64,
        sha256: row.get(4)?,
        initrd_id: row.get(5)?,
        ready_marker: row.get(6)?,
        created_at_ms: row.get(7)?,
        owner: row.get(8)?,
    }))
}
