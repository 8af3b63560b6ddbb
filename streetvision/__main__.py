from streetvision.cli import main

raise SystemExit(main())
