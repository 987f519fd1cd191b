//! A fleet shares its asset catalog, not its files: before a create copies an image or a boot
//! starts from one, the host fetches the files it lacks ([`AssetStore::ensure_local`]), on the
//! blocking pool (a fetch reads a directory or waits on a peer).

use super::*;
use crate::assets::fetch_time;
use crate::store::AssetRecord;

/// What a fetch may take beyond the store's own deadline before the service stops waiting.
const FETCH_GRACE: Duration = Duration::from_secs(10);

impl VmService {
    /// Makes sure this host has the files of every image `config` names (kernel, its initrd,
    /// root filesystem, drives), fetching those it lacks.
    pub(super) async fn fetch_assets(&self, config: &VmConfig) -> Result<(), ServiceError> {
        let assets = Arc::clone(&self.assets);
        let config = config.clone();
        let needed = move || -> Result<Vec<AssetRecord>, AssetError> {
            let kernel = assets.get_kind(&config.kernel_image_id, AssetKind::Kernel)?;
            let mut needed = Vec::new();
            if let Some(initrd) = &kernel.initrd_id {
                needed.push(assets.get_kind(initrd, AssetKind::Initrd)?);
            }
            needed.push(kernel);
            needed.push(assets.get_kind(&config.rootfs_image_id, AssetKind::Rootfs)?);
            for d in &config.drives {
                needed.push(assets.get_kind(&d.image_id, AssetKind::Rootfs)?);
            }
            // What this host has needs no fetch, nor a trip to the blocking pool each (every
            // create and boot asks; the images are nearly always here).
            needed.retain(|r| !assets.path_of(r).exists());
            Ok(needed)
        };
        for record in blocking(needed).await?.map_err(ServiceError::Asset)? {
            self.fetch_asset(record).await?;
        }
        Ok(())
    }

    /// This host's file of `record`, fetched if it has none.
    async fn fetch_asset(&self, record: AssetRecord) -> Result<PathBuf, ServiceError> {
        let limit = fetch_time(record.size_bytes) + FETCH_GRACE;
        let (id, assets) = (record.id.clone(), Arc::clone(&self.assets));
        let fetch = blocking(move || assets.ensure_local(&record));
        match tokio::time::timeout(limit, fetch).await {
            Ok(done) => done?.map_err(ServiceError::Asset),
            // The store gives up on its own by then; this is for a read stuck in the kernel
            // (a hung NFS mount). Its temporary file goes when that read ends.
            Err(_elapsed) => Err(ServiceError::Asset(AssetError::TimedOut {
                id,
                from: "its sources".into(),
            })),
        }
    }

    /// This host's file of the content `sha256`, open, and its size: what a fleet peer fetches.
    pub async fn local_asset(
        &self,
        sha256: &str,
    ) -> Result<Option<(tokio::fs::File, u64)>, ServiceError> {
        let (assets, sha256) = (Arc::clone(&self.assets), sha256.to_string());
        let Some((path, size)) = blocking(move || assets.local_by_sha256(&sha256))
            .await?
            .map_err(ServiceError::Asset)?
        else {
            return Ok(None);
        };
        match tokio::fs::File::open(&path).await {
            Ok(file) => Ok(Some((file, size))),
            // Removed since it was listed.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ServiceError::Io {
                op: "open asset",
                path,
                source,
            }),
        }
    }
}

/// Runs `f` on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ServiceError> {
    on_blocking_pool("fetch asset (task failed)", f).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assets::DirSource;
    use crate::testing::{config, fixture};

    /// A host of a fleet whose catalog has the fixture's images but whose disk has none: the
    /// create takes them from the operator's directory, verified; the boot finds them.
    #[tokio::test]
    async fn create_and_boot_fetch_the_images_this_host_lacks() {
        let f = fixture();
        let assets = &f.svc.assets;
        let records = assets.list().unwrap();
        for r in &records {
            std::fs::remove_file(assets.path_of(r)).unwrap();
        }
        let nfs = f._dir.path().join("nfs");
        std::fs::create_dir(&nfs).unwrap();
        assets.set_sources(vec![Arc::new(DirSource::new(nfs.clone()))]);

        // Nowhere to be had: the create says the host cannot have it now.
        let err = f.svc.create(&f.who, config()).await.unwrap_err();
        assert!(
            matches!(err, ServiceError::Asset(AssetError::Missing(_))),
            "{err:?}"
        );
        // Other content under the image's name is refused, and nothing of it kept.
        std::fs::write(nfs.join("k"), b"imagf").unwrap();
        let err = f.svc.create(&f.who, config()).await.unwrap_err();
        assert!(
            matches!(err, ServiceError::Asset(AssetError::Corrupt { .. })),
            "{err:?}"
        );
        std::fs::write(nfs.join(&records[0].sha256), b"image").unwrap();
        let vm = f.svc.create(&f.who, config()).await.unwrap();
        for id in ["k", "r"] {
            let r = records.iter().find(|r| r.id == id).unwrap();
            assert_eq!(std::fs::read(assets.path_of(r)).unwrap(), b"image", "{id}");
        }
        // The boot needs the kernel again: gone meanwhile, fetched again.
        let k = records.iter().find(|r| r.id == "k").unwrap();
        std::fs::remove_file(assets.path_of(k)).unwrap();
        f.svc.boot(&f.who, &vm.id).await.unwrap();
        assert!(assets.path_of(k).is_file());
    }
}
