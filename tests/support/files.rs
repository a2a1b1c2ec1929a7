//! Files for tests: fixtures copied to be changed (shared by the worker and engine tests).

/// Copies a folder tree (a model fixture to spoil, say).
pub fn copy_folder(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("create folder");
    for item in std::fs::read_dir(from).expect("read folder") {
        let item = item.expect("entry");
        let target = to.join(item.file_name());
        if item.file_type().expect("file type").is_dir() {
            copy_folder(&item.path(), &target);
        } else {
            std::fs::copy(item.path(), target).expect("copy file");
        }
    }
}
