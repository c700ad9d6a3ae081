//! ublk backend (default): a /dev/ublkbN served by libublk, one queue thread per CPU (up to 4),
//! each handling its requests synchronously through the engine. Without an overlay the device
//! carries the ublk read-only attribute, so the kernel itself refuses writes; with one it
//! advertises a volatile cache so FLUSH reaches the engine (overlay and audit log fsync).

use crate::daemon::{Ready, on_signals};
use crate::overlay::Engine;
use cli_common::CliError;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::{BufDescList, UblkDev, UblkIOCtx, UblkQueue};
use libublk::{BufDesc, UblkFlags, UblkIORes, sys};
use std::sync::Arc;

const READ_ONLY: u32 = 1 << 0; // UBLK_ATTR_READ_ONLY
const VOLATILE_CACHE: u32 = 1 << 2; // UBLK_ATTR_VOLATILE_CACHE
const IO_BUF_BYTES: u32 = 512 * 1024;

fn fail(msg: String) -> CliError {
    CliError::failure(msg)
}

/// Result of one request: bytes done, or a negative errno.
fn handle(engine: &Engine, op: u32, off: u64, buf: &mut [u8]) -> i32 {
    let r = match op {
        sys::UBLK_IO_OP_READ => engine.read_at(buf, off),
        sys::UBLK_IO_OP_WRITE => engine.write_at(buf, off),
        sys::UBLK_IO_OP_FLUSH => engine.flush(),
        sys::UBLK_IO_OP_WRITE_ZEROES => {
            buf.fill(0);
            engine.write_at(buf, off)
        }
        // Not advertised; a no-op keeps whatever is there, which discard permits.
        sys::UBLK_IO_OP_DISCARD => Ok(()),
        _ => return -libc::EINVAL,
    };
    match r {
        Ok(()) => buf.len() as i32,
        Err(e) => {
            tracing::warn!("ublk op {op} at {off}+{}: {e}", buf.len());
            -e.raw_os_error().unwrap_or(libc::EIO)
        }
    }
}

fn queue(qid: u16, dev: &UblkDev, engine: &Engine) {
    let mut bufs = dev.alloc_queue_io_bufs();
    let q = match UblkQueue::new(qid, dev)
        .and_then(|q| q.submit_fetch_commands_unified(BufDescList::Slices(Some(&bufs))))
    {
        Ok(q) => q,
        Err(e) => {
            tracing::error!("ublk queue {qid}: {e}");
            return;
        }
    };
    q.wait_and_handle_io(move |q: &UblkQueue, tag: u16, _io: &UblkIOCtx| {
        let iod = q.get_iod(tag);
        let op = iod.op_flags & 0xff;
        let off = iod.start_sector << 9;
        let len = (iod.nr_sectors as usize) << 9;
        let res = match bufs.get_mut(tag as usize) {
            Some(b) if op == sys::UBLK_IO_OP_FLUSH || op == sys::UBLK_IO_OP_DISCARD => {
                handle(engine, op, off, &mut b.as_mut_slice()[..0])
            }
            Some(b) if len <= b.len() => handle(engine, op, off, &mut b.as_mut_slice()[..len]),
            _ => -libc::EINVAL,
        };
        // Flush and discard carry no data but report success as 0 bytes.
        let res = if res == 0 && len > 0 && (op == sys::UBLK_IO_OP_DISCARD) {
            len as i32
        } else {
            res
        };
        let slice = bufs.get(tag as usize).map(|b| b.as_slice()).unwrap_or(&[]);
        if let Err(e) =
            q.complete_io_cmd_unified(tag, BufDesc::Slice(slice), Ok(UblkIORes::Result(res)))
        {
            tracing::error!("ublk completing tag {tag}: {e}");
        }
    });
}

/// Serve until a signal asks to detach.
pub fn serve(engine: Arc<Engine>, block_size: u32, ready: Ready) -> Result<(), CliError> {
    if !std::path::Path::new("/dev/ublk-control").exists() {
        return Err(fail(
            "this kernel has no ublk (/dev/ublk-control is missing; CONFIG_BLK_DEV_UBLK): \
             use --backend fuse"
                .into(),
        ));
    }
    let nr_queues = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4) as u16;
    let ctrl = Arc::new(
        UblkCtrlBuilder::default()
            .name("loop-immutable")
            .nr_queues(nr_queues)
            .depth(64)
            .io_buf_bytes(IO_BUF_BYTES)
            .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
            .build()
            .map_err(|e| fail(format!("cannot create a ublk device: {e}")))?,
    );
    // libublk's control ring is per thread: the signal thread talks to the device through a
    // control handle of its own.
    let id = ctrl.dev_info().dev_id as i32;
    on_signals(move || match UblkCtrl::new_simple(id) {
        Ok(c) => {
            if let Err(e) = c.kill_dev() {
                tracing::warn!("stopping ublk device {id}: {e}");
            }
        }
        Err(e) => tracing::warn!("ublk device {id}: {e}"),
    })?;
    let writable = engine.writable();
    let size = engine.size() / u64::from(block_size) * u64::from(block_size);
    let shift = block_size.trailing_zeros() as u8;
    let tgt_init = move |dev: &mut UblkDev| {
        dev.set_default_params(size);
        let p = &mut dev.tgt.params.basic;
        p.logical_bs_shift = shift;
        p.physical_bs_shift = shift.max(12);
        p.io_min_shift = shift;
        p.io_opt_shift = shift.max(12);
        p.attrs = if writable { VOLATILE_CACHE } else { READ_ONLY };
        Ok(())
    };
    let e2 = engine.clone();
    let q_fn = move |qid: u16, dev: &UblkDev| queue(qid, dev, &e2);
    let (tx, rx) = std::sync::mpsc::channel::<Result<(), CliError>>();
    let ready = std::sync::Mutex::new(Some(ready));
    let dev_fn = move |c: &UblkCtrl| {
        let id = c.dev_info().dev_id;
        let path = c.get_bdev_path();
        let r = match ready.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(f) => f(&path, Some(id)),
            None => Ok(()),
        };
        if r.is_err() {
            let _ = c.kill_dev();
        }
        let _ = tx.send(r);
    };
    let run = ctrl.run_target(tgt_init, q_fn, dev_fn);
    let _ = ctrl.del_dev();
    run.map_err(|e| fail(format!("ublk device failed: {e}")))?;
    match rx.try_recv() {
        Ok(r) => r,
        Err(_) => Err(fail("the ublk device never started".into())),
    }
}

/// Delete a ublk device whose daemon died.
pub fn delete(id: Option<u32>) {
    if let Some(id) = id
        && let Ok(c) = UblkCtrl::new_simple(id as i32)
        && let Err(e) = c.del_dev()
    {
        tracing::warn!("deleting ublk device {id}: {e}");
    }
}
