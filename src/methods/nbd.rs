//! NBD methods: `nbd_server_start` (one listener per call), `nbd_export_add`,
//! `nbd_export_remove`, `nbd_get_exports`, `nbd_server_stop`.

use std::sync::Arc;

use serde_json::{json, Value};
use tiercache_jsonrpc::schema::{
    NbdExportAddParams, NbdExportRemoveParams, NbdGetExportsParams, NbdServerStartParams, NoParams,
};
use tiercache_jsonrpc::RpcError;

use super::reg;
use crate::nbd_glue::{blocking, ListenAddr, NbdServer};
use crate::target::{errno_err, lock, ExportRec, Target};

pub fn register(t: &Arc<Target>) -> Result<(), RpcError> {
    reg(t, "nbd_server_start", |t, p: NbdServerStartParams| async move {
        let _g = t.ops.lock().await;
        let addr = ListenAddr::parse(&p.listen).map_err(|e| RpcError::invalid_params(format!("listen: {e}")))?;
        if lock(&t.nbd).listeners.iter().any(|(req, _)| *req == p.listen) {
            return Err(RpcError::exists(format!("the NBD server already listens on {}", p.listen)));
        }
        let server = server(&t);
        // A listener of a just-stopped server may take a moment to let go of its address.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let bound = loop {
            let r = blocking("nbd listen", || server.listen(&addr)).map_err(RpcError::internal)?;
            match r {
                Err(e) if e.to_string().contains("in use") && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                r => break r,
            }
        };
        let bound = bound.map_err(|e| {
            RpcError::from_errno(e.raw_os_error().unwrap_or(libc::EIO), format!("cannot listen on {}: {e}", p.listen))
        })?;
        log::info!("NBD server listening on {bound}");
        lock(&t.nbd).listeners.push((p.listen, bound.clone()));
        Ok(bound)
    })?;
    reg(t, "nbd_export_add", |t, p: NbdExportAddParams| async move {
        let _g = t.ops.lock().await;
        let export = p.effective_export_name().to_string();
        if lock(&t.nbd).exports.contains_key(&export) {
            return Err(RpcError::exists(format!("NBD export {export} already exists")));
        }
        let desc = t.open(&p.bdev_name)?;
        let server = server(&t);
        crate::nbd_glue::add_export(&server, &export, desc, p.read_only, None)
            .map_err(|e| errno_err(e, format!("cannot export bdev {} as {export}", p.bdev_name)))?;
        log::info!("NBD export {export}: bdev {}{}", p.bdev_name, if p.read_only { " (read-only)" } else { "" });
        lock(&t.nbd)
            .exports
            .insert(export.clone(), ExportRec { bdev_name: p.bdev_name, read_only: p.read_only, description: None });
        Ok(export)
    })?;
    reg(t, "nbd_export_remove", |t, p: NbdExportRemoveParams| async move {
        let _g = t.ops.lock().await;
        let server = {
            let nbd = lock(&t.nbd);
            if !nbd.exports.contains_key(&p.export_name) {
                return Err(RpcError::no_device(format!("NBD export {} not found", p.export_name)));
            }
            nbd.server.clone()
        };
        if let Some(s) = server {
            blocking("nbd remove_export", || s.remove_export(&p.export_name))
                .map_err(RpcError::internal)?
                .map_err(|e| errno_err(e, format!("cannot remove NBD export {}", p.export_name)))?;
        }
        lock(&t.nbd).exports.remove(&p.export_name);
        log::info!("NBD export {} removed", p.export_name);
        Ok(true)
    })?;
    reg(t, "nbd_get_exports", |t, p: NbdGetExportsParams| async move {
        let nbd = lock(&t.nbd);
        let live = nbd.server.as_ref().map(|s| s.exports()).unwrap_or_default();
        let mut out = Vec::new();
        for (name, e) in &nbd.exports {
            if p.export_name.as_ref().is_some_and(|n| n != name) {
                continue;
            }
            let (size, bs) =
                t.bdevs.get(&e.bdev_name).map(|b| (b.info().size_bytes(), b.info().block_size)).unwrap_or((0, 0));
            let mut v = json!({
                "export_name": name,
                "bdev_name": e.bdev_name,
                "read_only": e.read_only,
                "size": size,
                "block_size": bs,
                "connections": live.iter().find(|x| x.name == *name).map_or(0, |x| x.connections),
                "listen": nbd.listeners.iter().map(|(_, b)| b.clone()).collect::<Vec<_>>(),
            });
            if let Some(d) = &e.description {
                v["description"] = json!(d);
            }
            out.push(v);
        }
        if let Some(n) = &p.export_name {
            if out.is_empty() {
                return Err(RpcError::no_device(format!("NBD export {n} not found")));
            }
        }
        Ok(Value::Array(out))
    })?;
    reg(t, "nbd_server_stop", |t, _: NoParams| async move {
        let _g = t.ops.lock().await;
        let server = {
            let mut nbd = lock(&t.nbd);
            let s = nbd.server.take();
            nbd.listeners.clear();
            nbd.exports.clear();
            s
        };
        let Some(s) = server else {
            return Err(RpcError::no_device("the NBD server is not running"));
        };
        blocking("nbd stop", || s.stop()).map_err(RpcError::internal)?;
        log::info!("NBD server stopped");
        Ok(true)
    })?;
    Ok(())
}

/// The NBD server, created on first use.
fn server(t: &Arc<Target>) -> Arc<NbdServer> {
    let mut nbd = lock(&t.nbd);
    nbd.server.get_or_insert_with(|| NbdServer::new(t.reactors.clone())).clone()
}
