//! Sort-of-CLEVR (Santoro et al. 2017, "A simple neural network module for
//! relational reasoning", section 4 and appendix): 75×75 images of six
//! objects in six distinct colours, each a square or a circle, with ten
//! non-relational and ten relational questions per image.
//!
//! Generated as the authors' published generator does it:
//! - objects of half-size 5 px, centres drawn uniformly in
//!   `[5, 70)` and redrawn while closer than 10 px to an earlier centre;
//! - a square or a circle with probability ½;
//! - each question picks a colour and a subtype uniformly;
//! - the count question counts the queried object too (answers 1–6);
//! - 9,800 training images and 200 test images.
//!
//! The questions are rendered as English sentences instead of the
//! original 11-bit codes.

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};

/// Image side in pixels.
pub const SIZE: u32 = 75;
/// Half the side of a square, and a circle's radius.
pub const HALF: i32 = 5;
/// Objects (one per colour) in each image.
pub const OBJECTS: usize = 6;
/// Training and test images of the standard split.
pub const TRAIN_IMAGES: usize = 9_800;
pub const TEST_IMAGES: usize = 200;

/// The six colours, in the paper's order, with their RGB values.
pub const COLORS: [(&str, [u8; 3]); OBJECTS] = [
    ("red", [255, 0, 0]),
    ("green", [0, 255, 0]),
    ("blue", [0, 0, 255]),
    ("orange", [255, 156, 0]),
    ("gray", [128, 128, 128]),
    ("yellow", [255, 255, 0]),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Square,
    Circle,
}

impl Shape {
    pub fn name(self) -> &'static str {
        match self {
            Shape::Square => "square",
            Shape::Circle => "circle",
        }
    }
}

/// One object: its colour index into [`COLORS`], centre (x right, y down)
/// and shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Object {
    pub color: usize,
    pub x: i32,
    pub y: i32,
    pub shape: Shape,
}

/// The six question subtypes: three non-relational, three relational.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// The queried object's shape.
    Shape,
    /// Left or right half of the image.
    Horizontal,
    /// Top or bottom half.
    Vertical,
    /// The shape of the object closest to the queried one.
    Closest,
    /// The shape of the object furthest from it.
    Furthest,
    /// How many objects have its shape (itself included).
    Count,
}

impl Kind {
    pub const NON_RELATIONAL: [Kind; 3] = [Kind::Shape, Kind::Horizontal, Kind::Vertical];
    pub const RELATIONAL: [Kind; 3] = [Kind::Closest, Kind::Furthest, Kind::Count];

    pub fn relational(self) -> bool {
        Self::RELATIONAL.contains(&self)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Shape => "shape",
            Kind::Horizontal => "horizontal",
            Kind::Vertical => "vertical",
            Kind::Closest => "closest",
            Kind::Furthest => "furthest",
            Kind::Count => "count",
        }
    }
}

/// A question about one scene, with its answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Question {
    pub color: usize,
    pub kind: Kind,
    pub text: String,
    pub answer: String,
}

/// One image's objects and its twenty questions.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Scene {
    pub objects: Vec<Object>,
    pub questions: Vec<Question>,
}

fn dist2(a: &Object, b: &Object) -> i32 {
    (a.x - b.x).pow(2) + (a.y - b.y).pow(2)
}

/// The sentence and answer of a `kind` question about the object of colour
/// `color` in `objects` (one object per colour, in colour order).
pub fn ask(objects: &[Object], color: usize, kind: Kind) -> Question {
    let name = COLORS[color].0;
    let me = &objects[color];
    let others = || objects.iter().filter(move |o| o.color != color);
    let (text, answer) = match kind {
        Kind::Shape => (
            format!("What is the shape of the {name} object?"),
            me.shape.name().to_string(),
        ),
        Kind::Horizontal => (
            format!("Is the {name} object on the left or right of the image?"),
            if me.x < SIZE as i32 / 2 {
                "left"
            } else {
                "right"
            }
            .to_string(),
        ),
        Kind::Vertical => (
            format!("Is the {name} object on the top or bottom of the image?"),
            if me.y < SIZE as i32 / 2 {
                "top"
            } else {
                "bottom"
            }
            .to_string(),
        ),
        Kind::Closest => (
            format!("What is the shape of the object closest to the {name} object?"),
            // Ties go to the first in colour order, as argmin does.
            others()
                .min_by_key(|o| dist2(me, o))
                .map_or("none", |o| o.shape.name())
                .to_string(),
        ),
        Kind::Furthest => (
            format!("What is the shape of the object furthest from the {name} object?"),
            others()
                .fold(None::<&Object>, |best, o| match best {
                    Some(b) if dist2(me, b) >= dist2(me, o) => Some(b),
                    _ => Some(o),
                })
                .map_or("none", |o| o.shape.name())
                .to_string(),
        ),
        Kind::Count => (
            format!("How many objects have the same shape as the {name} object?"),
            objects
                .iter()
                .filter(|o| o.shape == me.shape)
                .count()
                .to_string(),
        ),
    };
    Question {
        color,
        kind,
        text,
        answer,
    }
}

/// For each object, the cell of a `g`×`g` grid over the image that holds
/// its centre, and the shapes of its nearest and its furthest other object
/// (ties to the first in colour order, as [`ask`] breaks them): the
/// targets of the trainer's `neighbour_probe`.
pub fn neighbour_targets(objects: &[Object], g: usize) -> Vec<(usize, Shape, Shape)> {
    objects
        .iter()
        .map(|me| {
            let cell = (me.y.max(0) as usize * g / SIZE as usize).min(g - 1) * g
                + (me.x.max(0) as usize * g / SIZE as usize).min(g - 1);
            let shape_of = |kind| match ask(objects, me.color, kind).answer.as_str() {
                "circle" => Shape::Circle,
                _ => Shape::Square,
            };
            (cell, shape_of(Kind::Closest), shape_of(Kind::Furthest))
        })
        .collect()
}

/// Scene `index` of the set drawn with `seed`: the same on every run and
/// whatever order scenes are drawn in.
pub fn scene(seed: u64, index: usize) -> Scene {
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        seed ^ (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    let mut objects: Vec<Object> = Vec::with_capacity(OBJECTS);
    for color in 0..OBJECTS {
        let (x, y) = loop {
            let x = rng.random_range(HALF..SIZE as i32 - HALF);
            let y = rng.random_range(HALF..SIZE as i32 - HALF);
            let clear = objects
                .iter()
                .all(|o| (o.x - x).pow(2) + (o.y - y).pow(2) >= (2 * HALF).pow(2));
            if clear {
                break (x, y);
            }
        };
        let shape = if rng.random_bool(0.5) {
            Shape::Square
        } else {
            Shape::Circle
        };
        objects.push(Object { color, x, y, shape });
    }
    let mut questions = Vec::with_capacity(20);
    for kinds in [Kind::NON_RELATIONAL, Kind::RELATIONAL] {
        for _ in 0..10 {
            let color = rng.random_range(0..OBJECTS);
            let kind = kinds[rng.random_range(0..kinds.len())];
            questions.push(ask(&objects, color, kind));
        }
    }
    Scene { objects, questions }
}

/// The objects of every scene in a `scenes.jsonl` that
/// `autoglm data sort-of-clevr` wrote, by image path (joined to the
/// file's directory, as the question files' paths are).
pub fn read_scenes(
    path: &std::path::Path,
) -> crate::Result<std::collections::HashMap<std::path::PathBuf, Vec<Object>>> {
    #[derive(serde::Deserialize)]
    struct Row {
        image: String,
        objects: Vec<RowObject>,
    }
    #[derive(serde::Deserialize)]
    struct RowObject {
        color: String,
        x: i32,
        y: i32,
        shape: String,
    }
    let text = std::fs::read_to_string(path).map_err(|e| crate::Error::io(path, e))?;
    let base = path
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let mut out = std::collections::HashMap::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let bad = |why: String| {
            crate::Error::Invalid(format!(
                "{}:{}: {why}; write the file again with `autoglm data sort-of-clevr`",
                path.display(),
                i + 1
            ))
        };
        let row: Row = serde_json::from_str(line).map_err(|e| bad(format!("not a scene: {e}")))?;
        let objects = row
            .objects
            .iter()
            .map(|o| {
                let color = COLORS
                    .iter()
                    .position(|(name, _)| *name == o.color)
                    .ok_or_else(|| bad(format!("unknown colour `{}`", o.color)))?;
                let shape = match o.shape.as_str() {
                    "square" => Shape::Square,
                    "circle" => Shape::Circle,
                    other => return Err(bad(format!("unknown shape `{other}`"))),
                };
                if !(0..SIZE as i32).contains(&o.x) || !(0..SIZE as i32).contains(&o.y) {
                    return Err(bad(format!(
                        "centre ({}, {}) is outside the {SIZE}² image",
                        o.x, o.y
                    )));
                }
                Ok(Object {
                    color,
                    x: o.x,
                    y: o.y,
                    shape,
                })
            })
            .collect::<crate::Result<Vec<_>>>()?;
        out.insert(base.join(&row.image), objects);
    }
    Ok(out)
}

/// The image of a scene: white, each object filled in its colour (squares
/// of side 11, circles of radius 5, as the reference drawing gives).
pub fn render(objects: &[Object]) -> RgbImage {
    let mut img = RgbImage::from_pixel(SIZE, SIZE, Rgb([255, 255, 255]));
    for o in objects {
        let rgb = Rgb(COLORS[o.color].1);
        for y in (o.y - HALF).max(0)..=(o.y + HALF).min(SIZE as i32 - 1) {
            for x in (o.x - HALF).max(0)..=(o.x + HALF).min(SIZE as i32 - 1) {
                let inside = match o.shape {
                    Shape::Square => true,
                    Shape::Circle => (x - o.x).pow(2) + (y - o.y).pow(2) <= HALF * HALF,
                };
                if inside {
                    img.put_pixel(x as u32, y as u32, rgb);
                }
            }
        }
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenes_read_back_as_written_and_bad_rows_are_named() {
        let dir = std::env::temp_dir().join(format!("soc-scenes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("scenes.jsonl");
        std::fs::write(
            &path,
            r#"{"image":"images/00007.png","split":"train","objects":[{"color":"gray","x":46,"y":38,"shape":"circle"}]}"#,
        )
        .unwrap();
        let scenes = read_scenes(&path).unwrap();
        let want = Object {
            color: 4,
            x: 46,
            y: 38,
            shape: Shape::Circle,
        };
        assert_eq!(scenes[&dir.join("images/00007.png")], vec![want]);
        for (row, why) in [
            (
                r#"{"image":"a.png","objects":[{"color":"pink","x":1,"y":1,"shape":"circle"}]}"#,
                "unknown colour `pink`",
            ),
            (
                r#"{"image":"a.png","objects":[{"color":"red","x":1,"y":1,"shape":"cube"}]}"#,
                "unknown shape `cube`",
            ),
            (
                r#"{"image":"a.png","objects":[{"color":"red","x":80,"y":1,"shape":"circle"}]}"#,
                "outside",
            ),
            ("[1, 2]", "not a scene"),
        ] {
            std::fs::write(&path, format!("\n{row}\n")).unwrap();
            let e = read_scenes(&path).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("scenes.jsonl:2"), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn obj(color: usize, x: i32, y: i32, shape: Shape) -> Object {
        Object { color, x, y, shape }
    }

    /// A hand-made scene whose answers are worked out by hand.
    fn known() -> Vec<Object> {
        use Shape::*;
        vec![
            obj(0, 10, 10, Square), // red: top left
            obj(1, 21, 10, Circle), // green: 11 px right of red
            obj(2, 60, 60, Circle), // blue: bottom right, furthest from red
            obj(3, 40, 15, Square), // orange
            obj(4, 15, 50, Square), // gray: bottom left
            obj(5, 60, 20, Circle), // yellow: top right
        ]
    }

    #[test]
    fn answers_of_a_known_scene() {
        let s = known();
        let a = |c, k| ask(&s, c, k).answer;
        assert_eq!(a(0, Kind::Shape), "square");
        assert_eq!(a(1, Kind::Shape), "circle");
        assert_eq!(a(0, Kind::Horizontal), "left");
        assert_eq!(a(5, Kind::Horizontal), "right");
        assert_eq!(a(0, Kind::Vertical), "top");
        assert_eq!(a(4, Kind::Vertical), "bottom");
        // Red's nearest is green (11 px); its furthest is blue.
        assert_eq!(a(0, Kind::Closest), "circle");
        assert_eq!(a(0, Kind::Furthest), "circle");
        // Gray (15, 50): nearest is red (≈40.3 px), then green (≈40.4).
        assert_eq!(a(4, Kind::Closest), "square");
        // Yellow (60, 20): furthest is gray (≈54.1) vs red (≈50.99).
        assert_eq!(a(5, Kind::Furthest), "square");
        // Three squares, three circles.
        assert_eq!(a(0, Kind::Count), "3");
        assert_eq!(a(2, Kind::Count), "3");
        let q = ask(&s, 3, Kind::Closest);
        assert_eq!(
            q.text,
            "What is the shape of the object closest to the orange object?"
        );
    }

    #[test]
    fn neighbour_targets_of_a_known_scene() {
        use Shape::*;
        let t = neighbour_targets(&known(), 8);
        // Red (10, 10) is in cell (1, 1); its nearest is green (a circle),
        // its furthest blue (a circle).
        assert_eq!(t[0], (8 + 1, Circle, Circle));
        // Gray (15, 50): row 50·8/75 = 5, column 1; nearest red (a square,
        // ≈40.3 against green's ≈40.4), furthest yellow (≈54.1, a circle).
        assert_eq!(t[4], (5 * 8 + 1, Square, Circle));
        // Yellow (60, 20): row 2, column 6; furthest gray (a square).
        assert_eq!(t[5].0, 2 * 8 + 6);
        assert_eq!(t[5].2, Square);
        assert_eq!(t.len(), OBJECTS);
    }

    #[test]
    fn scenes_follow_the_definition_and_repeat_by_seed() {
        let mut squares = 0;
        let mut counts = [0usize; 6];
        for i in 0..300 {
            let s = scene(7, i);
            assert_eq!(s.objects.len(), OBJECTS);
            for (c, o) in s.objects.iter().enumerate() {
                assert_eq!(o.color, c);
                assert!((HALF..SIZE as i32 - HALF).contains(&o.x), "{o:?}");
                assert!((HALF..SIZE as i32 - HALF).contains(&o.y), "{o:?}");
                for p in &s.objects[..c] {
                    assert!(dist2(o, p) >= 100, "{o:?} overlaps {p:?}");
                }
                squares += usize::from(o.shape == Shape::Square);
            }
            assert_eq!(s.questions.len(), 20);
            assert!(s.questions[..10].iter().all(|q| !q.kind.relational()));
            assert!(s.questions[10..].iter().all(|q| q.kind.relational()));
            for q in &s.questions {
                assert_eq!(q, &ask(&s.objects, q.color, q.kind));
                if q.kind == Kind::Count {
                    counts[q.answer.parse::<usize>().unwrap() - 1] += 1;
                }
            }
        }
        // Shapes are fair coins: 1,800 draws, 900 ± 4.5 σ.
        assert!((800..=1000).contains(&squares), "{squares}");
        assert!(counts.iter().all(|&n| n > 0), "{counts:?}");
        assert_eq!(scene(7, 42), scene(7, 42));
        assert_ne!(scene(7, 42), scene(8, 42));
    }

    #[test]
    fn rendering_draws_each_object_in_its_colour() {
        let s = known();
        let img = render(&s);
        assert_eq!(img.dimensions(), (75, 75));
        for o in &s {
            assert_eq!(img.get_pixel(o.x as u32, o.y as u32).0, COLORS[o.color].1);
            // A square fills its corner; a circle leaves it white.
            let corner = img.get_pixel((o.x + HALF) as u32, (o.y + HALF) as u32).0;
            match o.shape {
                Shape::Square => assert_eq!(corner, COLORS[o.color].1),
                Shape::Circle => assert_eq!(corner, [255, 255, 255]),
            }
        }
        let coloured = img.pixels().filter(|p| p.0 != [255, 255, 255]).count();
        // 3 squares of 11² and 3 circles of radius 5 (81 pixels each).
        assert_eq!(coloured, 3 * 121 + 3 * 81);
    }
}
