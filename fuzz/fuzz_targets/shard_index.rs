//! The sharded-checkpoint index parser (`model.safetensors.index.json`): never panics, and
//! every shard name it accepts stays one plain file inside the checkpoint folder.
#![no_main]

use ladle::checkpoint::parse_index;
use libfuzzer_sys::fuzz_target;
use object_store::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(index) = parse_index(data) else {
        return;
    };
    let folder = Path::from("ckpt/folder");
    for file in index.weight_map.values() {
        assert!(file.ends_with(".safetensors"));
        // As the reader builds a shard's path: one more segment under the folder, same prefix.
        let p = folder.clone().join(file.as_str());
        assert_eq!(p.parts().count(), 3, "{file:?} -> {p}");
        assert!(p.prefix_matches(&folder), "{file:?} -> {p}");
    }
});
