//! The cache file format: one parquet file per data shard, its schema, the footer that carries its own
//! [`ShardEntry`], and reading it back with every column type checked.

use super::*;

/// The cache file schema (docs/formats.md).
pub fn schema() -> SchemaRef {
    let list = |t: DataType| DataType::List(Arc::new(Field::new("item", t, true)));
    Arc::new(Schema::new(vec![
        Field::new("row", DataType::Int64, false),
        Field::new("id", DataType::Utf8, false),
        Field::new("prompt_ids", list(DataType::Int32), false),
        Field::new("chosen_ids", list(DataType::Int32), false),
        Field::new("chosen_logps", list(DataType::Float32), false),
        Field::new("rejected_ids", list(DataType::Int32), false),
        Field::new("rejected_logps", list(DataType::Float32), false),
    ]))
}

/// Buffers pairs into row groups of [`ROW_GROUP_ROWS`] and writes them to a parquet file.
pub(super) struct PairSink<'a> {
    pub(super) writer: ArrowWriter<File>,
    pub(super) buf: Vec<CachedPair>,
    pub(super) rows: u64,
    pub(super) path: &'a Path,
}

impl<'a> PairSink<'a> {
    pub(super) fn new(file: File, path: &'a Path) -> Result<Self, CacheError> {
        let werr = |e: parquet::errors::ParquetError| CacheError::Write {
            file: path.to_owned(),
            reason: e.to_string(),
        };
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).map_err(werr)?))
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .set_max_row_group_bytes(None)
            .build();
        let writer = ArrowWriter::try_new(file, schema(), Some(props)).map_err(werr)?;
        Ok(Self {
            writer,
            buf: Vec::new(),
            rows: 0,
            path,
        })
    }

    pub(super) fn werr(&self, reason: String) -> CacheError {
        CacheError::Write {
            file: self.path.to_owned(),
            reason,
        }
    }

    pub(super) fn push(&mut self, p: CachedPair) -> Result<(), CacheError> {
        self.buf.push(p);
        self.rows += 1;
        if self.buf.len() >= ROW_GROUP_ROWS {
            self.flush()?;
        }
        Ok(())
    }

    pub(super) fn flush(&mut self) -> Result<(), CacheError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let batch = to_batch(&self.buf).map_err(|e| self.werr(e.to_string()))?;
        self.buf.clear();
        self.writer
            .write(&batch)
            .map_err(|e| self.werr(e.to_string()))?;
        self.writer.flush().map_err(|e| self.werr(e.to_string()))
    }

    pub(super) fn finish(mut self, entry: &ShardEntry) -> Result<(), CacheError> {
        self.flush()?;
        let json = serde_json::to_string(entry).expect("plain data serialises");
        self.writer
            .append_key_value_metadata(KeyValue::new(FOOTER_KEY.to_string(), json));
        let path = self.path;
        let file = self.writer.into_inner().map_err(|e| CacheError::Write {
            file: path.to_owned(),
            reason: e.to_string(),
        })?;
        file.sync_all().map_err(io_err(path))
    }
}

pub(super) fn to_batch(pairs: &[CachedPair]) -> Result<RecordBatch, arrow::error::ArrowError> {
    fn ids<'p>(pairs: &'p [CachedPair], f: impl Fn(&'p CachedPair) -> &'p [u32]) -> ArrayRef {
        let mut b = ListBuilder::new(Int32Builder::new());
        for p in pairs {
            b.values()
                .append_slice(&f(p).iter().map(|&v| v as i32).collect::<Vec<_>>());
            b.append(true);
        }
        Arc::new(b.finish())
    }
    fn logps<'p>(pairs: &'p [CachedPair], f: impl Fn(&'p CachedPair) -> &'p [f32]) -> ArrayRef {
        let mut b = ListBuilder::new(Float32Builder::new());
        for p in pairs {
            b.values().append_slice(f(p));
            b.append(true);
        }
        Arc::new(b.finish())
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(
            pairs.iter().map(|p| p.row as i64),
        )),
        Arc::new(StringArray::from_iter_values(pairs.iter().map(|p| &p.id))),
        ids(pairs, |p| &p.prompt_ids),
        ids(pairs, |p| &p.chosen_ids),
        logps(pairs, |p| &p.chosen_logps),
        ids(pairs, |p| &p.rejected_ids),
        logps(pairs, |p| &p.rejected_logps),
    ];
    RecordBatch::try_new(schema(), cols)
}

/// The [`ShardEntry`] in a cache file's footer.
pub fn read_footer(file: &Path) -> Result<ShardEntry, CacheError> {
    let corrupt = |reason: String| CacheError::Corrupt {
        file: file.to_owned(),
        reason,
    };
    let f = File::open(file).map_err(io_err(file))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(f)
        .map_err(|e| corrupt(format!("not a readable parquet file: {e}")))?;
    let json = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|k| k.key == FOOTER_KEY))
        .and_then(|k| k.value.clone())
        .ok_or_else(|| corrupt(format!("no `{FOOTER_KEY}` footer entry")))?;
    serde_json::from_str(&json)
        .map_err(|e| corrupt(format!("bad `{FOOTER_KEY}` footer entry: {e}")))
}

pub(super) fn read_pairs(file: &Path) -> Result<Vec<CachedPair>, CacheError> {
    let corrupt = |reason: String| CacheError::Corrupt {
        file: file.to_owned(),
        reason,
    };
    let f = File::open(file).map_err(io_err(file))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(f)
        .and_then(|b| b.with_batch_size(ROW_GROUP_ROWS).build())
        .map_err(|e| corrupt(format!("not a readable parquet file: {e}")))?;
    let want = schema();
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| corrupt(e.to_string()))?;
        for (i, field) in want.fields().iter().enumerate() {
            let got = batch.schema();
            let ok = got.fields().get(i).is_some_and(|g| {
                g.name() == field.name() && same_type(g.data_type(), field.data_type())
            });
            if !ok {
                return Err(corrupt(format!(
                    "column {i} should be `{}` {}, the file has {:?}",
                    field.name(),
                    field.data_type(),
                    got.fields()
                        .get(i)
                        .map(|g| (g.name().clone(), g.data_type().clone()))
                )));
            }
        }
        let col = |i: usize| batch.column(i);
        let rows = col(0).as_primitive::<Int64Type>();
        let ids = col(1).as_string::<i32>();
        let lists_u32 = |i: usize| -> Vec<Vec<u32>> {
            let l = col(i).as_list::<i32>();
            (0..l.len())
                .map(|r| {
                    l.value(r)
                        .as_primitive::<Int32Type>()
                        .values()
                        .iter()
                        .map(|&v| v as u32)
                        .collect()
                })
                .collect()
        };
        let lists_f32 = |i: usize| -> Vec<Vec<f32>> {
            let l = col(i).as_list::<i32>();
            (0..l.len())
                .map(|r| l.value(r).as_primitive::<Float32Type>().values().to_vec())
                .collect()
        };
        let (prompt, chosen, chosen_lp, rejected, rejected_lp) = (
            lists_u32(2),
            lists_u32(3),
            lists_f32(4),
            lists_u32(5),
            lists_f32(6),
        );
        for (r, ((((p, c), clp), rj), rlp)) in prompt
            .into_iter()
            .zip(chosen)
            .zip(chosen_lp)
            .zip(rejected)
            .zip(rejected_lp)
            .enumerate()
        {
            if rows.is_null(r) || ids.is_null(r) {
                return Err(corrupt(format!("null row or id in batch row {r}")));
            }
            let row = rows.value(r);
            if c.len() != clp.len() || rj.len() != rlp.len() {
                return Err(corrupt(format!(
                    "row {row}: log-probs do not align with ids"
                )));
            }
            out.push(CachedPair {
                row: row as u64,
                id: ids.value(r).to_owned(),
                prompt_ids: p,
                chosen_ids: c,
                chosen_logps: clp,
                rejected_ids: rj,
                rejected_logps: rlp,
            });
        }
    }
    if out.windows(2).any(|w| w[0].row >= w[1].row) {
        return Err(corrupt("rows are not in increasing order".into()));
    }
    Ok(out)
}

/// Types equal up to list item field names and nullability (other writers name list items differently).
pub(super) fn same_type(a: &DataType, b: &DataType) -> bool {
    match (a, b) {
        (DataType::List(x), DataType::List(y)) => same_type(x.data_type(), y.data_type()),
        _ => a == b,
    }
}
