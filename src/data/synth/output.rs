//! Parquet output: the RLHF-V layout's schema and atomically written shards.

use super::*;

pub(super) fn schema() -> SchemaRef {
    let features = r#"{"info": {"features": {"ds_name": {"dtype": "string", "_type": "Value"}, "image": {"_type": "Image"}, "text": {"dtype": "string", "_type": "Value"}, "origin_dataset": {"dtype": "string", "_type": "Value"}, "origin_split": {"dtype": "string", "_type": "Value"}, "idx": {"dtype": "int64", "_type": "Value"}, "image_path": {"dtype": "string", "_type": "Value"}, "scene": {"dtype": "string", "_type": "Value"}}}}"#;
    let metadata = HashMap::from([("huggingface".to_string(), features.to_string())]);
    Arc::new(
        Schema::new(vec![
            Field::new("ds_name", DataType::Utf8, true),
            Field::new("image", DataType::Struct(image_fields()), true),
            Field::new("text", DataType::Utf8, true),
            Field::new("origin_dataset", DataType::Utf8, true),
            Field::new("origin_split", DataType::Utf8, true),
            Field::new("idx", DataType::Int64, true),
            Field::new("image_path", DataType::Utf8, true),
            // Not an RLHF-V column: the scene the image shows, for `ddpo evaluate` (readers ignore it).
            Field::new("scene", DataType::Utf8, true),
        ])
        .with_metadata(metadata),
    )
}

pub(super) fn image_fields() -> Fields {
    Fields::from(vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ])
}

/// Writes one shard under a temporary name, then renames it into place. Returns the edits it holds.
pub(super) fn write_shard(
    opts: &SynthOptions,
    schema: &SchemaRef,
    rows: Range<usize>,
    path: &Path,
) -> Result<usize, SynthError> {
    let tmp = fsx::temp_sibling(path);
    let result = write_shard_to(opts, schema, rows, path, &tmp).and_then(|edits| {
        fsx::commit(&tmp, path).map_err(|source| SynthError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(edits)
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

pub(super) fn write_shard_to(
    opts: &SynthOptions,
    schema: &SchemaRef,
    rows: Range<usize>,
    path: &Path,
    tmp: &Path,
) -> Result<usize, SynthError> {
    let pq_err = |source| SynthError::Parquet {
        path: path.to_path_buf(),
        source,
    };
    let io_err = |source| SynthError::Io {
        path: tmp.to_path_buf(),
        source,
    };
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).map_err(pq_err)?))
        .set_max_row_group_row_count(Some(opts.rows_per_group))
        .set_max_row_group_bytes(None)
        .build();
    let file = File::create(tmp).map_err(io_err)?;
    let mut writer = ArrowWriter::try_new(file, schema.clone(), Some(props)).map_err(pq_err)?;
    let origin_split = format!(
        "{{\"type\": \"synthetic\", \"seed\": {}, \"generator\": \"{GENERATOR}\"}}",
        opts.seed
    );
    let mut edits = 0;
    let mut start = rows.start;
    while start < rows.end {
        let end = (start + opts.rows_per_group).min(rows.end);
        let generated = generate_rows(opts.seed, start..end, opts.image_size, opts.difficulty);
        let mut batch_rows = Vec::with_capacity(generated.len());
        for (i, row) in generated.into_iter().enumerate() {
            let row = row.map_err(|source| SynthError::Image {
                path: path.to_path_buf(),
                idx: (start + i) as u64,
                source,
            })?;
            edits += row.edits.len();
            batch_rows.push(row);
        }
        let batch = build_batch(schema, &batch_rows, &origin_split).map_err(|source| {
            SynthError::Arrow {
                path: path.to_path_buf(),
                source,
            }
        })?;
        writer.write(&batch).map_err(pq_err)?;
        writer.flush().map_err(pq_err)?;
        start = end;
    }
    let file = writer.into_inner().map_err(pq_err)?;
    file.sync_all().map_err(io_err)?;
    Ok(edits)
}

pub(super) fn build_batch(
    schema: &SchemaRef,
    rows: &[SynthRow],
    origin_split: &str,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let n = rows.len();
    let paths: Vec<String> = rows.iter().map(|r| image_path(r.idx)).collect();
    let texts: Vec<String> = rows.iter().map(|r| r.text_json()).collect();
    let fields = image_fields();
    let image = StructArray::try_new(
        fields,
        vec![
            Arc::new(BinaryArray::from_iter_values(rows.iter().map(|r| &r.png))) as ArrayRef,
            Arc::new(StringArray::from_iter_values(&paths)) as ArrayRef,
        ],
        None,
    )?;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
            DS_NAME, n,
        ))),
        Arc::new(image),
        Arc::new(StringArray::from_iter_values(&texts)),
        Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
            ORIGIN_DATASET,
            n,
        ))),
        Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
            origin_split,
            n,
        ))),
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|r| r.idx as i64),
        )),
        Arc::new(StringArray::from_iter_values(&paths)),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.scene))),
    ];
    RecordBatch::try_new(schema.clone(), columns)
}

pub(super) fn image_path(idx: u64) -> String {
    format!("synthetic/{idx:08}.png")
}

/// Generates rows `range` in parallel (each row depends only on its own index, so order is preserved and
/// the result is the same whatever the number of threads).
pub(super) fn generate_rows(
    seed: u64,
    range: Range<usize>,
    image_size: u32,
    level: Difficulty,
) -> Vec<Result<SynthRow, image::ImageError>> {
    let n = range.len();
    let threads = std::thread::available_parallelism()
        .map(|t| t.get())
        .unwrap_or(1)
        .clamp(1, 16)
        .min(n.div_ceil(8).max(1));
    if threads <= 1 {
        return range
            .map(|i| generate_row(seed, i as u64, image_size, level))
            .collect();
    }
    let chunk = n.div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let lo = range.start + (t * chunk).min(n);
                let hi = range.start + ((t + 1) * chunk).min(n);
                scope.spawn(move || {
                    (lo..hi)
                        .map(|i| generate_row(seed, i as u64, image_size, level))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("synthetic row generator thread panicked"))
            .collect()
    })
}
