//! `autoglm data …`: datasets this project generates, written in the
//! JSON-lines VQA format so that any user can inspect them and `autoglm
//! train` reads them as they are.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use autoglm::data::sort_of_clevr::{self, Scene};
use clap::{Args, Subcommand};
use rayon::prelude::*;
use serde_json::json;

use crate::Global;

#[derive(Subcommand)]
pub enum DataCommand {
    /// Sort-of-CLEVR (Santoro et al. 2017): 75×75 images of six coloured
    /// squares and circles, 10 non-relational and 10 relational questions
    /// each. Writes images/, {train,test}.jsonl, the same split by kind
    /// ({train,test}-{relational,non-relational}.jsonl) and scenes.jsonl.
    SortOfClevr(SortOfClevrArgs),
}

#[derive(Args)]
pub struct SortOfClevrArgs {
    /// Output directory (created; files there are replaced).
    #[arg(long)]
    out: PathBuf,
    /// Training images (the paper's split: 9,800).
    #[arg(long, default_value_t = sort_of_clevr::TRAIN_IMAGES)]
    train_images: usize,
    /// Test images (the paper's split: 200).
    #[arg(long, default_value_t = sort_of_clevr::TEST_IMAGES)]
    test_images: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn data(g: &Global, cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::SortOfClevr(a) => sort_of_clevr_cmd(g, a),
    }
}

fn sort_of_clevr_cmd(g: &Global, a: SortOfClevrArgs) -> Result<()> {
    if a.train_images + a.test_images == 0 {
        bail!("--train-images and --test-images are both 0: nothing to write");
    }
    let t0 = Instant::now();
    let images = a.out.join("images");
    std::fs::create_dir_all(&images).with_context(|| format!("creating {}", images.display()))?;
    let n = a.train_images + a.test_images;
    // Scenes in index order, drawn and written in parallel: scene i is the
    // same whatever the threads.
    let scenes: Vec<Scene> = (0..n)
        .into_par_iter()
        .map(|i| -> Result<Scene> {
            let s = sort_of_clevr::scene(a.seed, i);
            let path = images.join(format!("{i:05}.png"));
            let mut png = Vec::new();
            sort_of_clevr::render(&s.objects)
                .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
            autoglm::train::write_atomic(&path, &png)?;
            Ok(s)
        })
        .collect::<Result<_>>()?;
    let mut counts = serde_json::Map::new();
    let mut all_scenes = String::new();
    for (split, range) in [("train", 0..a.train_images), ("test", a.train_images..n)] {
        let mut rows = String::new();
        // The same rows again by kind, so `autoglm eval` scores each alone.
        let (mut rel_rows, mut non_rel_rows) = (String::new(), String::new());
        let (mut rel, mut non_rel) = (0, 0);
        for i in range {
            let image = format!("images/{i:05}.png");
            for q in &scenes[i].questions {
                let relational = q.kind.relational();
                if relational {
                    rel += 1;
                } else {
                    non_rel += 1;
                }
                let row = json!({"image": image, "question": q.text, "answer": q.answer,
                    "relational": relational, "type": q.kind.name(),
                    "color": sort_of_clevr::COLORS[q.color].0})
                .to_string()
                    + "\n";
                rows.push_str(&row);
                if relational {
                    rel_rows.push_str(&row);
                } else {
                    non_rel_rows.push_str(&row);
                }
            }
            all_scenes.push_str(
                &(json!({"image": image, "split": split, "objects": scenes[i].objects.iter().map(|o| json!({
                    "color": sort_of_clevr::COLORS[o.color].0, "x": o.x, "y": o.y, "shape": o.shape.name()})).collect::<Vec<_>>()})
                .to_string()
                    + "\n"),
            );
        }
        for (name, text) in [
            (format!("{split}.jsonl"), &rows),
            (format!("{split}-relational.jsonl"), &rel_rows),
            (format!("{split}-non-relational.jsonl"), &non_rel_rows),
        ] {
            autoglm::train::write_atomic(&a.out.join(name), text.as_bytes())?;
        }
        counts.insert(
            split.into(),
            json!({"relational": rel, "non_relational": non_rel}),
        );
    }
    autoglm::train::write_atomic(&a.out.join("scenes.jsonl"), all_scenes.as_bytes())?;
    let report = json!({"out": a.out, "images": n, "questions": counts,
        "seed": a.seed, "seconds": t0.elapsed().as_secs_f64()});
    if g.json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}
