//! Write the seed corpus of the `image` target into the directory given as argument.

fn main() {
    let dir = std::env::args_os().nth(1).expect("usage: seeds DIR");
    let dir = std::path::Path::new(&dir);
    std::fs::create_dir_all(dir).expect("create seed directory");
    for (name, bytes) in blobfs_fuzz::seed_images() {
        std::fs::write(dir.join(name), bytes).expect("write seed");
    }
}
