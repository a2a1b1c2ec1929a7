//! Job previews as textures for the Jobs tab. Each file is read and decoded once, on a
//! background thread (the UI thread never touches the disk), and uploaded as a texture when
//! it arrives; after that, drawing it costs nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

enum Slot {
    Loading,
    Ready(egui::TextureHandle),
    Missing,
}

type Loaded = (PathBuf, Option<egui::ColorImage>);

pub struct ThumbnailCache {
    slots: HashMap<PathBuf, Slot>,
    sender: mpsc::Sender<Loaded>,
    receiver: mpsc::Receiver<Loaded>,
    loads_started: usize,
}

impl Default for ThumbnailCache {
    fn default() -> Self {
        let (sender, receiver) = mpsc::channel();
        Self {
            slots: HashMap::new(),
            sender,
            receiver,
            loads_started: 0,
        }
    }
}

impl ThumbnailCache {
    /// Turns finished loads into textures.
    pub fn receive(&mut self, ctx: &egui::Context) {
        for (path, image) in self.receiver.try_iter() {
            let slot = match image {
                Some(image) => Slot::Ready(ctx.load_texture(
                    path.to_string_lossy(),
                    image,
                    egui::TextureOptions::LINEAR,
                )),
                None => Slot::Missing,
            };
            self.slots.insert(path, slot);
        }
    }

    /// The texture for `path` once it is loaded; the first call starts the load.
    pub fn get(&mut self, ctx: &egui::Context, path: &Path) -> Option<&egui::TextureHandle> {
        if !self.slots.contains_key(path) {
            self.slots.insert(path.to_path_buf(), Slot::Loading);
            self.loads_started += 1;
            let sender = self.sender.clone();
            let ctx = ctx.clone();
            let owned = path.to_path_buf();
            let spawned = std::thread::Builder::new()
                .name("thumbnail".to_owned())
                .spawn(move || {
                    let image = crate::thumbnails::load(&owned);
                    let _ = sender.send((owned, image));
                    ctx.request_repaint();
                });
            if spawned.is_err() {
                self.slots.insert(path.to_path_buf(), Slot::Missing);
            }
        }
        match self.slots.get(path) {
            Some(Slot::Ready(texture)) => Some(texture),
            Some(Slot::Loading | Slot::Missing) | None => None,
        }
    }

    /// How many files were read so far (each at most once).
    pub fn loads_started(&self) -> usize {
        self.loads_started
    }
}
