"""The vocabulary the OCR generators render: common English words of 4-8 letters that the VQA
answer normalisation leaves unchanged (no articles, number words, yes/no or contractions), so a
word read right always scores. Which words are test words is decided by a hash (`synth.in_test`),
never by this order."""

WORDS: tuple[str, ...] = tuple(
    """
    apple arrow autumn bakery banana basket beach bicycle bird blanket boat bottle bread bridge brush bucket
    butter button cabin cake camera candle canoe carpet castle cheese cherry circus clock cloud coffee comet
    cookie copper corner cotton country cousin cradle crayon cricket crown cupcake curtain dancer desert
    diamond dinner doctor dolphin donkey dragon drawer dream eagle earth engine fabric falcon farmer feather
    fence field finger flower forest fountain garden garlic ginger giraffe glove goose grape guitar hammer
    harbor helmet honey horse hotel island jacket jelly jungle kettle kitten ladder lemon letter library
    lizard lobster magnet mango marble meadow melon mirror monkey morning mountain muffin museum needle
    noodle ocean office olive orange orchard oyster paddle palace panda paper parrot peach pencil pepper
    piano pickle pillow pirate planet pocket pony potato puppy puzzle rabbit radio rain river rocket saddle
    salad sandal school season shadow shell shovel silver sister sketch sleeve spider spoon spring square
    squirrel stable station stone storm street sugar summer sunset sweater table tiger tomato tower tractor
    travel tree truck tulip tunnel turtle umbrella valley velvet violin wagon walnut window winter wizard
    yellow zebra anchor badge bamboo barrel beacon beetle blossom bonnet cactus carrot cedar chalk cobalt
    coral daisy denim ember fern fiddle flute frost galaxy glacier gravel hazel holly iris ivory jade kayak
    kiwi lantern lava lilac linen maple mint mosaic nectar nutmeg oasis onion opal pebble petal pine plum
    prism quartz quill raven reef ribbon ruby saffron sage satin scarf shore slate spruce tango thistle
    thunder timber topaz twig vanilla walrus willow yarn zinc acorn almond antler apron attic bagel ballet
    banjo beaver bison blender bolt bounty bramble breeze brick bugle burrow cabbage camel canyon cargo
    cashew cello chapel cider clover cobble condor cove crater crumb dune flannel fossil gazelle geyser
    goblet gopher granite harp hornet igloo jasmine kernel koala lagoon lemur llama locket lotus lynx
    mammoth marsh meteor mitten moose nugget orbit otter paprika parsley peanut pelican penguin pewter plaza
    pollen poppy pretzel pumpkin quail radish raisin rhubarb robin salmon sapphire sardine sequoia sherbet
    sorbet sparrow sponge starling sundae swan tapir teapot thimble toucan truffle tundra turnip vapor vest
    waffle wheat whistle yacht yogurt zephyr
""".split()
)
