"""Names fixed by the data sources and the study: findings, groups, splits."""

# The 14 CheXpert findings, in MIMIC-CXR-JPG's column order.
FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)

# The source study's six race groups.
RACE_GROUPS = (
    "Asian",
    "Black or African American",
    "Hispanic/Latino",
    "Other",
    "Unknown",
    "White",
)

# MIMIC-CXR-JPG's official split names.
SPLITS = ("train", "validate", "test")

FRONTAL_VIEWS = ("PA", "AP")

# The synthetic cohort's removable planted harms (the kinds of its ground-truth file); a scenario
# may plant none of a kind, and the tables then show it with 0 planted images.
PLANTED_KINDS = ("label_flip", "shortcut")

# Underdiagnosis of Seyyed-Kalantari et al. (2021, Nature Medicine), MIMIC-CXR, mean over 5 seeds: the false
# positive rate of "No Finding" per race. Shown beside a real MIMIC run's own rates, never on synthetic data.
SEYYED_KALANTARI_MIMIC_NO_FINDING_FPR = {"White": 0.170, "Black or African American": 0.276}
